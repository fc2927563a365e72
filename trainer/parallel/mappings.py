"""Every collective of tensor and sequence parallelism and of data-parallel synchronisation, counted and timed.

Two layers:

* Primitives -- ``all_reduce``, ``all_gather``, ``reduce_scatter`` and the local ``split``; point-to-point
  ``send``/``recv`` and the star-shaped ``reduce_to_root``/``broadcast_from_root`` of a parameter server
  (trainer.parallel.dp_sync) -- run over a process group passed in, and record it in a ``CommStats`` passed in.
* Autograd mappings pair a forward primitive with the backward primitive that is its adjoint
  (Megatron-LM's ``mappings.py``; Shoeybi et al. 2019, Korthikanti et al. 2022):

      mapping              forward                      backward
      copy_to_tp           identity                     all-reduce
      reduce_from_tp       all-reduce                   identity
      scatter_to_tp        split last dim               all-gather last dim
      gather_from_tp       all-gather last dim          split last dim
      scatter_to_seq       split sequence               all-gather sequence
      gather_from_seq      all-gather sequence          split sequence
      all_gather_seq       all-gather sequence          reduce-scatter sequence
      reduce_scatter_seq   reduce-scatter sequence      all-gather sequence

The gather_from_seq / all_gather_seq pair differ only in backward: the first is for a consumer
whose input gradient is already complete on every rank (``lm_logits`` all-reduces it), the second
for a column-parallel layer, whose input gradient is a partial sum over the tp ranks.

Activations are (B, T, h), so the sequence dimension is 1. On a group of one rank every mapping is
the identity and nothing is recorded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

SEQ_DIM = 1  # activations are (B, T, h)


@dataclass
class CommRecord:
    """Totals for one kind of collective.

    ``elements`` and ``bytes`` are the collective's logical size, the full (unsharded) buffer: the
    all-reduced tensor, the all-gather output, the reduce-scatter input (nccl-tests' "size"). A
    ring moves (p-1)/p of that per rank for an all-gather or a reduce-scatter and 2(p-1)/p for an
    all-reduce, so sequence parallelism's all-gather + reduce-scatter pair of b·s·h costs what the
    all-reduce of b·s·h it replaces costs.
    """

    count: int = 0
    elements: int = 0
    bytes: int = 0
    seconds: float = 0.0


class CommStats:
    """Per-kind counters (``all_reduce``, ``all_gather``, ``reduce_scatter``) owned by whoever passes
    them to the mappings, e.g. one per tensor-parallel provider.

    ``seconds`` is host wall time around each call. Collectives on an accelerator are asynchronous,
    so that is launch time unless ``synchronize=True``, which waits for the device before and after
    each call (exact, but it serialises compute and communication: for benchmarks, not training).
    """

    def __init__(self, synchronize: bool = False):
        self.synchronize = synchronize
        self._records: dict[str, CommRecord] = {}

    def __getitem__(self, kind: str) -> CommRecord:
        return self._records.get(kind, CommRecord())

    def kinds(self) -> list[str]:
        return sorted(self._records)

    def snapshot(self) -> dict[str, CommRecord]:
        return {kind: replace(record) for kind, record in self._records.items()}

    def reset(self) -> None:
        self._records.clear()

    @contextmanager
    def record(self, kind: str, full: torch.Tensor) -> Iterator[None]:
        """Count one ``kind`` collective over ``full`` (see ``CommRecord``) and time its body."""
        sync = self.synchronize and full.device.type != "cpu"
        if sync:
            torch.accelerator.synchronize()
        start = time.perf_counter()
        yield
        if sync:
            torch.accelerator.synchronize()
        rec = self._records.setdefault(kind, CommRecord())
        rec.count += 1
        rec.elements += full.numel()
        rec.bytes += full.numel() * full.element_size()
        rec.seconds += time.perf_counter() - start


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


# --- primitives -------------------------------------------------------------------------------


def gather_objects(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's ``obj`` in group-rank order, on every rank (pickled; for records, not tensors). Not
    counted: it carries measurements, outside the measured step."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (local; no communication)."""
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {size}")
    return x.chunk(size, dim)[group_rank(group)].contiguous()


def all_reduce(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    stats: CommStats,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """Reduce ``x`` over the group IN PLACE and return it; the caller must own ``x``."""
    if group_size(group) == 1:
        return x
    with stats.record("all_reduce", x):
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in group-rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    # The single-tensor collective gathers along dim 0 (the form gloo and nccl both take), so
    # gather (size·d0, ...) and re-concatenate the size chunks along ``dim``.
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    with stats.record("all_gather", out):
        dist.all_gather_single(out, x, group=group)
    return out if dim == 0 else torch.cat(out.chunk(size, 0), dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk along ``dim``."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {size}")
    # The single-tensor collective scatters dim-0 chunks: stack the ``dim`` chunks along dim 0.
    stacked = torch.cat(x.chunk(size, dim), 0) if dim != 0 else x.contiguous()
    out = x.new_empty((stacked.shape[0] // size, *stacked.shape[1:]))
    with stats.record("reduce_scatter", stacked):
        dist.reduce_scatter_single(out, stacked, group=group)
    return out


def send(x: torch.Tensor, dst: int, group: dist.ProcessGroup, stats: CommStats) -> None:
    """Send ``x`` to group rank ``dst`` (point to point)."""
    with stats.record("send", x):
        dist.send(x, group=group, group_dst=dst)


def recv(x: torch.Tensor, src: int, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Receive group rank ``src``'s message into ``x`` and return it."""
    with stats.record("recv", x):
        dist.recv(x, group=group, group_src=src)
    return x


def reduce_to_root(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Sum ``x`` over the group onto group rank 0 (IN PLACE there; unchanged elsewhere). Every other rank
    sends its ``x`` straight to rank 0, a star rather than the backend's tree or ring, so rank 0's link
    carries (size-1)·|x|: a parameter server's traffic."""
    size = group_size(group)
    if size == 1:
        return x
    if group_rank(group) != 0:
        send(x, 0, group, stats)
        return x
    incoming = torch.empty_like(x)
    for src in range(1, size):
        x += recv(incoming, src, group, stats)
    return x


def broadcast_from_root(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Group rank 0's ``x`` into ``x`` on every rank, sent to each rank straight from rank 0 (a star)."""
    size = group_size(group)
    if size == 1:
        return x
    if group_rank(group) != 0:
        return recv(x, 0, group, stats)
    for dst in range(1, size):
        send(x, dst, group, stats)
    return x


# --- autograd mappings ------------------------------------------------------------------------

_Op = Callable[[torch.Tensor, dist.ProcessGroup, CommStats], torch.Tensor]


def _identity(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    # Out of place: the input of a forward may be saved for backward, and autograd hands the same
    # gradient tensor to several branches (e.g. both operands of a residual add).
    return all_reduce(x.clone(memory_format=torch.contiguous_format), group, stats)


def _split(dim: int) -> _Op:
    return lambda x, group, stats: split(x, dim, group)


def _gather(dim: int) -> _Op:
    return functools.partial(all_gather, dim=dim)


def _reduce_scatter(dim: int) -> _Op:
    return functools.partial(reduce_scatter, dim=dim)


class _Collective(torch.autograd.Function):
    """y = forward_op(x); dL/dx = backward_op(dL/dy). The two ops must be adjoint."""

    @staticmethod
    def forward(ctx, x, forward_op: _Op, backward_op: _Op, group, stats):
        ctx.backward_op, ctx.group, ctx.stats = backward_op, group, stats
        return forward_op(x, group=group, stats=stats)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, group=ctx.group, stats=ctx.stats), None, None, None, None


def _apply(x: torch.Tensor, forward_op: _Op, backward_op: _Op, group, stats: CommStats) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _Collective.apply(x, forward_op, backward_op, group, stats)


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input.

    Forward: identity. Backward: all-reduce (each rank holds a partial gradient of the input).
    """
    return _apply(x, _identity, _sum, group, stats)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the ranks' partial outputs.

    Forward: all-reduce. Backward: identity (the replicated output's gradient is complete everywhere).
    """
    return _apply(x, _sum, _identity, group, stats)


def scatter_to_tp(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(..., n) -> (..., n/tp), this rank's chunk of the last dimension.

    Forward: split. Backward: all-gather along the last dimension.
    """
    return _apply(x, _split(-1), _gather(-1), group, stats)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(..., n/tp) -> (..., n), the ranks' chunks concatenated along the last dimension.

    Forward: all-gather along the last dimension. Backward: split.
    """
    return _apply(x, _gather(-1), _split(-1), group, stats)


def scatter_to_seq(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(B, T, h) -> (B, T/tp, h), this rank's chunk of the sequence.

    Forward: split along the sequence. Backward: all-gather along the sequence.
    """
    return _apply(x, _split(SEQ_DIM), _gather(SEQ_DIM), group, stats)


def gather_from_seq(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(B, T/tp, h) -> (B, T, h) for a consumer whose input gradient is complete on every rank.

    Forward: all-gather along the sequence. Backward: split along the sequence.
    """
    return _apply(x, _gather(SEQ_DIM), _split(SEQ_DIM), group, stats)


def all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(B, T/tp, h) -> (B, T, h) in front of a column-parallel layer, whose input gradient is partial.

    Forward: all-gather along the sequence. Backward: reduce-scatter along the sequence.
    """
    return _apply(x, _gather(SEQ_DIM), _reduce_scatter(SEQ_DIM), group, stats)


def reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> torch.Tensor:
    """(B, T, h) partial sums -> (B, T/tp, h), this rank's sequence chunk of their total.

    Forward: reduce-scatter along the sequence. Backward: all-gather along the sequence.
    """
    return _apply(x, _reduce_scatter(SEQ_DIM), _gather(SEQ_DIM), group, stats)
