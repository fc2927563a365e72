"""Rank layout, its agreement with DeepSpeed's topology, and the process groups of a Mesh."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.parallel.dims import Coords, ParallelDims, build_mesh

from .spawn import run_ranks

LAYOUTS = [
    (world, tp, pp)
    for world in range(1, 9)
    for tp in range(1, world + 1)
    for pp in range(1, world + 1)
    if world % (tp * pp) == 0
]


@pytest.mark.parametrize("world, tp, pp", [(8, 2, 2), (8, 4, 1), (6, 3, 1), (8, 1, 8)])
def test_megatron_order_tp_fastest_pp_slowest(world, tp, pp):
    dims = ParallelDims(world, tp, pp)
    for rank in range(world):
        c = dims.coords(rank)
        assert rank == c.pp * dims.dp * tp + c.dp * tp + c.tp
        assert dims.rank(c) == rank
    # Adjacent ranks share a tensor-parallel group.
    assert dims.groups("tp")[0] == list(range(tp))


def test_coords_example():
    dims = ParallelDims(8, tp=2, pp=2)
    assert dims.dp == 2
    assert dims.coords(5) == Coords(tp=1, dp=0, pp=1)
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_agrees_with_deepspeed_topology(world, tp, pp):
    dims = ParallelDims(world, tp, pp)
    topo = dims.deepspeed_topology()
    assert topo.world_size() == world
    for rank in range(world):
        ds = topo.get_coord(rank)
        assert dims.coords(rank) == Coords(tp=ds.model, dp=ds.data, pp=ds.pipe)
    for axis, ds_axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
        assert dims.groups(axis) == topo.get_axis_comm_lists(ds_axis)
    # DeepSpeed's PipelineParallelGrid builds its model-parallel groups exactly so.
    assert dims.model_parallel_groups() == [sorted(topo.get_axis_list("data", d)) for d in range(dims.dp)]


@pytest.mark.parametrize(
    "world, tp, pp",
    [(4, 3, 1), (8, 4, 4), (4, 0, 1), (4, 1, 0), (4, -2, 1), (0, 1, 1), (4, 2.0, 1)],
)
def test_invalid_degrees_rejected(world, tp, pp):
    with pytest.raises(ValueError):
        ParallelDims(world, tp, pp)


def test_coords_rejects_rank_outside_world():
    with pytest.raises(ValueError):
        ParallelDims(4, 2).coords(4)


def _check_mesh(rank: int, world: int) -> None:
    for tp, pp in [(2, 1), (2, 2), (1, 2), (4, 1), (1, 1)][: 1 if world == 1 else None]:
        if world % (tp * pp):
            continue
        dims = ParallelDims(world, tp, pp)
        mesh = build_mesh(dims)
        c = dims.coords(rank)
        assert mesh.coords == c
        tp_ranks = next(g for g in dims.groups("tp") if rank in g)
        dp_ranks = next(g for g in dims.groups("dp") if rank in g)
        pp_ranks = next(g for g in dims.groups("pp") if rank in g)
        mp_ranks = next(g for g in dims.model_parallel_groups() if rank in g)

        assert dist.get_process_group_ranks(mesh.get_tensor_model_parallel_group()) == tp_ranks
        assert dist.get_process_group_ranks(mesh.get_data_parallel_group()) == dp_ranks
        assert dist.get_process_group_ranks(mesh.get_pipe_parallel_group()) == pp_ranks
        assert dist.get_process_group_ranks(mesh.get_model_parallel_group()) == mp_ranks

        assert (mesh.get_tensor_model_parallel_rank(), mesh.get_tensor_model_parallel_world_size()) == (
            c.tp,
            tp,
        )
        assert (mesh.get_slice_parallel_rank(), mesh.get_slice_parallel_world_size()) == (c.tp, tp)
        assert (mesh.get_data_parallel_rank(), mesh.get_data_parallel_world_size()) == (c.dp, dims.dp)
        assert (mesh.get_pipe_parallel_rank(), mesh.get_pipe_parallel_world_size()) == (c.pp, pp)
        assert mesh.get_pipeline_model_parallel_rank() == c.pp
        assert mesh.get_model_parallel_rank() == c.pp * tp + c.tp
        assert mesh.get_model_parallel_world_size() == tp * pp
        assert mesh.get_data_parallel_group_ranks() == dp_ranks
        assert mesh.get_tensor_model_parallel_src_rank() == tp_ranks[0]
        assert mesh.get_global_rank() == rank

        # The groups really communicate among the right ranks.
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=mesh.tp_group)
        assert x.item() == sum(tp_ranks)
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=mesh.dp_group)
        assert x.item() == sum(dp_ranks)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, 4])
def test_mesh_groups_and_mpu(world):
    run_ranks(_check_mesh, world)
