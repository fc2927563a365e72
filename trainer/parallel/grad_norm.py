"""The gradient norm of one model replica under tensor (and pipeline) parallelism, each parameter
counted once: the sum of squares every rank contributes, and its reduction for the trainer's log."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.parallel.dims import Mesh
from trainer.parallel.mappings import CommStats, all_reduce


def counted_once(param: nn.Parameter, first_tp_rank: bool) -> bool:
    """Whether this rank's copy of ``param`` enters one replica's gradient norm: the shards of tensor-parallel
    parameters from every tp rank, the replicated parameters (LayerNorm, row biases, position embedding) from
    tp rank 0 only, and never a pipeline's second copy of the tied embedding (``ds_pipe_replicated``, on the
    last stage)."""
    return not getattr(param, "ds_pipe_replicated", False) and (
        first_tp_rank or getattr(param, "tensor_model_parallel", False)
    )


def local_grad_squares(params: Iterable[nn.Parameter], first_tp_rank: bool, device=None) -> torch.Tensor:
    """This rank's share of ||g||² of one replica (``counted_once``). Summed over the ranks of the replica
    it is the dense model's ||g||²."""
    grads = [p.grad.detach() for p in params if p.grad is not None and counted_once(p, first_tp_rank)]
    squares = [g.float().pow(2).sum() for g in grads]
    return torch.stack(squares).sum() if squares else torch.zeros((), device=device)


def global_grad_norm(params: Iterable[nn.Parameter], mesh: Mesh, stats: CommStats) -> float:
    """||g||₂ of a pp=1 replica (the tp group holds all of it), counted in ``stats``. DeepSpeed computes
    the same sum inside its clipping but does not keep the value without ZeRO."""
    total = local_grad_squares(params, mesh.coords.tp == 0)
    return all_reduce(total, mesh.tp_group, stats).sqrt().item()
