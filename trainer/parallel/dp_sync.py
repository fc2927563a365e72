"""How data-parallel replicas stay in step (``parallel.dp_sync``), for the schemes DeepSpeed's engine does
not run itself. The engine keeps its gradients local (``enable_backward_allreduce = False``, ZeRO 0, no
pipeline: validate refuses the rest) and the step runner calls two hooks:

    after_backward   the last backward of a step is done; the optimizer has not stepped
    after_step(k)    optimizer step k (1-based) is done

    allreduce          DeepSpeed all-reduces the gradients inside backward; both hooks do nothing
    parameter_server   after_backward: gradients -> dp rank 0, summed; their mean -> every rank (a star,
                       trainer.parallel.mappings.reduce_to_root / broadcast_from_root); every replica then
                       steps its optimizer on the same gradients, as under allreduce
    local_sgd          gradients stay local and every replica steps on its own; after_step on sync steps
                       (trainer.analysis.formulas.is_sync_step: every H-th and the last) all-reduces the
                       parameters to their mean, or with outer_optimizer=nesterov (DiLoCo) takes
                       Δ = θ_last_sync - mean(θ) as an outer gradient for SGD with Nesterov momentum

Gradients and parameters travel as one flat fp32 buffer: one message per peer, Ψ·4 bytes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainer.analysis.formulas import is_sync_step
from trainer.config.schema import ParallelConfig
from trainer.parallel.dims import Mesh
from trainer.parallel.mappings import CommStats, all_reduce, broadcast_from_root, reduce_to_root


class DPSync:
    """``allreduce``: the engine's own gradient all-reduce; nothing to do here. ``comm`` counts the
    scheme's own messages (empty for this one)."""

    def __init__(self):
        self.comm = CommStats()

    def after_backward(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass


def _copy_flat(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(value)


class ParameterServer(DPSync):
    def __init__(self, params: list[nn.Parameter], mesh: Mesh):
        super().__init__()
        self.params, self.group, self.n = params, mesh.dp_group, mesh.dims.dp

    def after_backward(self) -> None:
        grads = [p.grad for p in self.params]
        flat = reduce_to_root(_flatten_dense_tensors(grads), self.group, self.comm)
        flat /= self.n  # only the server's sum is sent on
        _copy_flat(broadcast_from_root(flat, self.group, self.comm), grads)


class LocalSGD(DPSync):
    def __init__(self, params: list[nn.Parameter], mesh: Mesh, p: ParallelConfig, steps: int):
        super().__init__()
        self.params, self.group, self.n = params, mesh.dp_group, mesh.dims.dp
        self.interval, self.steps = p.sync_interval, steps
        self.outer = None
        if p.outer_optimizer == "nesterov":
            # θ at the last sync, the same on every replica: the outer optimizer's parameter.
            self.anchor = _flatten_dense_tensors([q.detach() for q in params]).clone().requires_grad_()
            momentum = p.outer_momentum  # 0: plain SGD on the delta (torch's Nesterov needs a momentum)
            self.outer = torch.optim.SGD([self.anchor], lr=p.outer_lr, momentum=momentum, nesterov=momentum > 0)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if not is_sync_step(step, self.interval, self.steps):
            return
        tensors = [q.data for q in self.params]
        mean = all_reduce(_flatten_dense_tensors(tensors), self.group, self.comm) / self.n
        if self.outer is not None:
            self.anchor.grad = self.anchor - mean  # the outer gradient: the replicas' mean change, negated
            self.outer.step()
            mean = self.anchor
        _copy_flat(mean, tensors)


def build_dp_sync(p: ParallelConfig, engine, mesh: Mesh, steps: int) -> DPSync:
    """The scheme ``p.dp_sync`` over ``engine``'s parameters; switches the engine's own all-reduce off for
    every scheme but ``allreduce``."""
    if p.dp_sync == "allreduce":
        return DPSync()
    engine.enable_backward_allreduce = False
    params = [q for q in engine.module.parameters() if q.requires_grad]
    if p.dp_sync == "parameter_server":
        return ParameterServer(params, mesh)
    return LocalSGD(params, mesh, p, steps)
