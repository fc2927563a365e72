"""Learning-rate schedule: linear warmup to ``optim.lr``, then cosine decay to ``optim.min_lr``."""

from __future__ import annotations

import math

import torch

from trainer.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def scheduler_factory(optim: OptimConfig, total_steps: int):
    """A callable DeepSpeed calls with the optimizer it built (its base lr is ``optim.lr``)."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim, total_steps) / optim.lr)

    return build
