"""Parallel degrees, the rank layout, and the process groups DeepSpeed reads through ``mpu``.

Ranks are laid out as Megatron-LM and DeepSpeed's ``PipeModelDataParallelTopology`` do, with the
tensor-parallel coordinate fastest and the pipeline coordinate slowest:

    rank = pp_rank · (dp · tp) + dp_rank · tp + tp_rank

Tensor parallelism communicates in every layer, twice forward and twice backward, so its ranks are
adjacent and stay inside one node (NVLink); data parallelism reduces gradients once per step and
pipeline parallelism only sends activations between neighbouring stages, so they span nodes.

``ParallelDims`` is pure arithmetic, usable before any process group exists. ``build_mesh`` turns
it into a ``Mesh`` of process groups once ``torch.distributed`` is initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch.distributed as dist

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

# Axes from slowest to fastest, named as DeepSpeed's topology names them (tp is its "model" axis).
AXES = ("pp", "dp", "tp")
_DEEPSPEED_AXIS = {"pp": "pipe", "dp": "data", "tp": "model"}


class Coords(NamedTuple):
    """A rank's position on each parallel axis."""

    tp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor (tp), pipeline (pp) and, derived from the world size, data (dp) parallelism."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"tp*pp = {self.tp}*{self.pp} = {self.tp * self.pp} must divide world_size={self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def coords(self, rank: int) -> Coords:
        """Global rank -> (tp_rank, dp_rank, pp_rank)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} outside the world of {self.world_size}")
        return Coords(tp=rank % self.tp, dp=rank // self.tp % self.dp, pp=rank // (self.tp * self.dp))

    def rank(self, coords: Coords) -> int:
        """(tp_rank, dp_rank, pp_rank) -> global rank."""
        return (coords.pp * self.dp + coords.dp) * self.tp + coords.tp

    def groups(self, axis: str) -> list[list[int]]:
        """Rank lists of every group along ``axis``: ranks that differ only in that coordinate.

        Groups are ordered by the remaining coordinates, slowest axis first, and ranks within a
        group by their coordinate on ``axis`` -- the order of DeepSpeed's ``get_axis_comm_lists``.
        """
        if axis not in AXES:
            raise ValueError(f"axis={axis!r}: must be one of {AXES}")
        others = [a for a in AXES if a != axis]
        lists: list[list[int]] = []
        for slow in range(self.size(others[0])):
            for fast in range(self.size(others[1])):
                fixed = {others[0]: slow, others[1]: fast}
                lists.append([self.rank(Coords(**fixed, **{axis: i})) for i in range(self.size(axis))])
        return lists

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks that together hold one model replica (same dp coordinate): the tp x pp groups."""
        return [sorted(r for r in range(self.world_size) if self.coords(r).dp == dp) for dp in range(self.dp)]

    def deepspeed_topology(self) -> PipeModelDataParallelTopology:
        """The same layout as DeepSpeed's topology object (axes pipe, data, model)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # heavy import

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


@dataclass(frozen=True)
class _Axis:
    group: dist.ProcessGroup
    ranks: list[int]  # global ranks of the group, in group-rank order
    rank: int  # this process's rank within the group


class Mesh:
    """This process's groups for every parallel axis; also the ``mpu`` object DeepSpeed expects.

    DeepSpeed (0.19.8) reads ``mpu`` in ``deepspeed.initialize``: the data-parallel group for
    gradient reduction and ZeRO partitioning, the tensor-parallel rank to count replicated
    parameters once in the gradient norm (``bwc_tensor_model_parallel_rank``), and the
    model-parallel group to sum the norm and the overflow flag across the shards of one replica.
    As in DeepSpeed's own ``PipelineParallelGrid``, "model parallel" means tp x pp (every rank of
    one replica) and "slice parallel" means tp. Ulysses-style ``get_sequence_parallel_*`` methods are
    deliberately absent: Megatron sequence parallelism lives inside the tp group and does not
    shrink the data-parallel world as DeepSpeed's sequence parallelism would.
    """

    def __init__(self, dims: ParallelDims, rank: int, axes: dict[str, _Axis]):
        self.dims = dims
        self.rank = rank
        self.coords = dims.coords(rank)
        self._axes = axes

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self._axes["tp"].group

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._axes["dp"].group

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self._axes["pp"].group

    def topology(self) -> PipeModelDataParallelTopology:
        return self.dims.deepspeed_topology()

    def get_global_rank(self) -> int:
        return self.rank

    # Tensor parallelism ("slice" in DeepSpeed's grid).
    def get_tensor_model_parallel_rank(self) -> int:
        return self._axes["tp"].rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._axes["tp"].group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tp group (the broadcast source)."""
        return self._axes["tp"].ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # Model parallelism: tp x pp, every rank that holds a part of this replica.
    def get_model_parallel_rank(self) -> int:
        return self._axes["mp"].rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._axes["mp"].group

    # Data parallelism.
    def get_data_parallel_rank(self) -> int:
        return self._axes["dp"].rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._axes["dp"].group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._axes["dp"].ranks)

    # Pipeline parallelism, under both the DeepSpeed and the Megatron name.
    def get_pipe_parallel_rank(self) -> int:
        return self._axes["pp"].rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return self._axes["pp"].group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group


def build_mesh(dims: ParallelDims) -> Mesh:
    """Create the tp, dp, pp and model-parallel (tp x pp) groups; collective over the whole world.

    ``dist.new_group`` must be called by every rank for every group, in the same order, even for
    groups the rank is not in; the order here is fixed by ``ParallelDims.groups``.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed to be initialised first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != dims.world_size:
        raise ValueError(f"ParallelDims.world_size={dims.world_size} but torch.distributed has {world} ranks")
    rank_lists = {axis: dims.groups(axis) for axis in ("tp", "dp", "pp")}
    rank_lists["mp"] = dims.model_parallel_groups()
    axes: dict[str, _Axis] = {}
    for name, lists in rank_lists.items():
        for ranks in lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                axes[name] = _Axis(group, ranks, ranks.index(rank))
    return Mesh(dims, rank, axes)
