"""The analytic traffic of the data-parallel synchronisation schemes, and DiLoCo's outer step (one process)."""

from __future__ import annotations

import pytest
import torch

from trainer.analysis.formulas import dp_sync_traffic, is_sync_step, link_bytes
from trainer.analysis.planner.cluster import Link
from trainer.analysis.planner.costmodel import dp_sync_time

PSI = 1000.0


def test_ring_parameter_server_and_periodic_traffic():
    ring = dp_sync_traffic("allreduce", PSI, 4)
    assert ring.rank == ring.busiest_link == 2 * 3 / 4 * PSI
    server = dp_sync_traffic("parameter_server", PSI, 4)
    assert (server.rank, server.busiest_link) == (PSI, 3 * PSI)  # the server is one of the 4 ranks
    periodic = dp_sync_traffic("local_sgd", PSI, 4, syncs_per_step=1 / 16)
    assert periodic.rank == periodic.busiest_link == ring.rank / 16
    assert dp_sync_traffic("parameter_server", PSI, 1).busiest_link == 0.0
    with pytest.raises(ValueError):
        dp_sync_traffic("gossip", PSI, 4)


def test_link_bytes_split_sent_and_received():
    assert link_bytes("send", PSI, 4) == (PSI, 0.0)
    assert link_bytes("recv", PSI, 4) == (0.0, PSI)
    assert link_bytes("all_reduce", PSI, 4) == (1.5 * PSI, 1.5 * PSI)


def test_sync_steps_are_every_interval_and_the_last():
    assert [k for k in range(1, 11) if is_sync_step(k, 4, 10)] == [4, 8, 10]


def test_time_is_the_busiest_link_over_the_bandwidth_plus_latency():
    link = Link(bandwidth=1e9, latency=1e-6)
    server = dp_sync_time("parameter_server", 1e9, 4, 1.0, link)
    assert server == pytest.approx(3.0 + 6e-6)  # (N-1)·Ψ through the server's link, 2(N-1) messages
    assert dp_sync_time("allreduce", 1e9, 4, 1.0, link) == pytest.approx(1.5 + 6e-6)
    assert dp_sync_time("local_sgd", 1e9, 4, 1 / 4, link) == pytest.approx((1.5 + 6e-6) / 4)


def _local_sgd(outer_optimizer: str, **outer):
    from types import SimpleNamespace

    from trainer.config.schema import ParallelConfig
    from trainer.parallel.dp_sync import LocalSGD

    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    cfg = ParallelConfig(dp_sync="local_sgd", sync_interval=2, outer_optimizer=outer_optimizer, **outer)
    mesh = SimpleNamespace(dp_group=None, dims=SimpleNamespace(dp=1))  # one replica: the mean is itself
    return param, LocalSGD([param], mesh, cfg, steps=10)


def test_diloco_outer_step_is_nesterov_sgd_over_the_delta():
    param, sync = _local_sgd("nesterov")
    for step, local in ((1, [0.0, 0.0]), (2, [0.5, 1.0]), (3, [0.0, 0.0]), (4, [0.0, 1.5])):
        param.data.copy_(torch.tensor(local))
        sync.after_step(step)
    # step 2: Δ = [0.5, 1] (θ₀ - θ), v = Δ, θ₀ ← θ₀ - 0.7·(Δ + 0.9·v) = θ₀ - 1.33·Δ
    theta = torch.tensor([1.0, 2.0]) - 1.33 * torch.tensor([0.5, 1.0])
    delta = theta - torch.tensor([0.0, 1.5])  # step 4
    velocity = 0.9 * torch.tensor([0.5, 1.0]) + delta
    theta = theta - 0.7 * (delta + 0.9 * velocity)
    assert torch.allclose(param.data, theta)


def test_local_sgd_without_outer_optimizer_keeps_the_mean():
    param, sync = _local_sgd("none")
    param.data.copy_(torch.tensor([3.0, 4.0]))
    sync.after_step(1)  # not a sync step
    sync.after_step(2)
    assert param.data.tolist() == [3.0, 4.0]


def test_compare_layout_names_choose_the_scheme():
    from trainer.analysis.compare.runner import parse_layout

    diloco = parse_layout("dp4-diloco16", 4)
    assert (diloco.dp_sync, diloco.sync_interval, diloco.outer_optimizer) == ("local_sgd", 16, "nesterov")
    assert "parallel.dp_sync=parameter_server" in parse_layout("dp4-ps", 4).overrides()
    assert parse_layout("dp4", 4).dp_sync == "allreduce"


def test_sync_row_of_local_sgd_counts_the_steps_that_synced():
    from trainer.analysis.compare.runner import parse_layout
    from trainer.analysis.compare.sync import sync_result

    synced = {"dp_comm": {"all_reduce": {"count": 1, "bytes": 4 * PSI}}}
    steps = [{"step": k, "ranks": [synced if k % 4 == 0 else {}] * 4} for k in range(1, 9)]  # of 10 steps
    row = sync_result(parse_layout("dp4-local4", 4), steps, 10, PSI)
    ring = 2 * 3 / 4 * 4 * PSI
    assert row.rank_bytes == row.predicted_rank_bytes == row.busiest_link_bytes == ring * 2 / 8  # steps 4 and 8
    assert set(row.predicted_seconds) and all(s > 0 for s in row.predicted_seconds.values())
