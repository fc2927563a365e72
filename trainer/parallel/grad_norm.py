"""The global gradient norm of a tensor-parallel model, each parameter counted once."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.parallel.dims import Mesh
from trainer.parallel.mappings import CommStats, all_reduce


def global_grad_norm(params: Iterable[nn.Parameter], mesh: Mesh, stats: CommStats) -> float:
    """||g||₂ over the whole model replica: the shards of tensor-parallel parameters from every tp
    rank, the replicated parameters (LayerNorm, row biases, position embedding) from tp rank 0 only.

    Equals the dense model's norm at tp=1. (DeepSpeed computes the same sum inside its clipping
    but does not keep the value without ZeRO.)
    """
    first_tp_rank = mesh.coords.tp == 0
    squares = [
        p.grad.detach().float().pow(2).sum()
        for p in params
        if p.grad is not None and (first_tp_rank or getattr(p, "tensor_model_parallel", False))
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    return all_reduce(total, mesh.tp_group, stats).sqrt().item()
