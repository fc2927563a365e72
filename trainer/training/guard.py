"""Non-finite steps: skip the update, count it, and stop after too many in a row.

DeepSpeed already skips a step whose gradients are not finite in its fp16 optimizer (dynamic loss
scaling), in ZeRO-1/2 (the gradient norm comes out inf/NaN; with bf16 only when
``bf16.check_grad_overflow`` is on) and counts it in ``engine.skipped_steps`` without moving the
learning-rate schedule; at ZeRO-0 in bf16 its wrapper's step is ``compat.foreach_fp16_step``, which skips
too. At ZeRO-0 in fp32 it applies whatever it has; ``install_nonfinite_skip`` gives that path the same
behaviour. ``SkipCounter`` turns the count into a clean stop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from trainer.runtime.compat import skip_optimizer_step_when, skips_nonfinite


class TooManySkips(RuntimeError):
    """Raised after ``train.max_skipped_steps`` consecutive non-finite steps."""


def install_nonfinite_skip(engine) -> bool:
    """Make a ZeRO-0 engine's optimizer step skip when any rank holds a non-finite gradient.

    The flag is reduced over every rank (gradients of other pipeline stages or tp shards may be the
    bad ones); DeepSpeed then counts the skip and holds the schedule
    (``trainer.runtime.compat.skip_optimizer_step_when``, for the run). Returns whether it installed
    (ZeRO-1/2/3, fp16 and bf16's ``compat.foreach_fp16_step`` have their own check).
    """
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or skips_nonfinite(engine.optimizer):
        return False
    optimizer = engine.optimizer

    def any_rank_nonfinite() -> bool:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = _any_nonfinite(grads, engine.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())  # one host sync per optimizer step

    skip_optimizer_step_when(engine, any_rank_nonfinite)
    return True


def _any_nonfinite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """1.0 where a tensor holds an inf or NaN (or its norm overflows), from the per-tensor norms: a few
    multi-tensor kernels, where ``isfinite(t).all()`` allocated a full-size boolean tensor per gradient."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return (~torch.isfinite(torch.stack(norms).sum())).float()


class SkipCounter:
    """Follows ``engine.skipped_steps``; raises TooManySkips after ``limit`` skips in a row (0 = never)."""

    def __init__(self, engine, limit: int):
        self.engine, self.limit = engine, limit
        self.seen = engine.skipped_steps
        self.in_a_row = 0

    def update(self, step: int) -> bool:
        """Call after optimizer step ``step`` (1-based); returns whether that step was skipped."""
        skipped = self.engine.skipped_steps > self.seen
        self.seen = self.engine.skipped_steps
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.limit and self.in_a_row >= self.limit:
            raise TooManySkips(
                f"step {step}: {self.in_a_row} consecutive steps had a non-finite loss or gradient "
                f"(train.max_skipped_steps={self.limit}); the last checkpoint is intact; lower optim.lr, "
                "check the data, or resume from an earlier checkpoint"
            )
        return skipped


class NaNInjection:
    """Fault injection for tests: makes the token embedding's output NaN on chosen optimizer steps
    (1-based, read from the engine's step counter), so the loss and every gradient of those steps
    are NaN whatever the layout. Validation passes (eval mode) are left alone."""

    def __init__(self, engine, steps: Iterable[int]):
        self.engine, self.steps = engine, set(steps)

    def attach(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if name.split(".")[-1] == "wte":
                module.register_forward_hook(self._poison)

    def _poison(self, module, inputs, output):
        if module.training and self.engine.global_steps + 1 in self.steps:
            return output * float("nan")
        return output
