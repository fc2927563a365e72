"""Each autograd mapping's forward and backward against its definition, and what it records."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.parallel import mappings as M
from trainer.parallel.mappings import CommStats

from .spawn import run_ranks

pytestmark = pytest.mark.multiproc

B, T, H = 2, 8, 12


def _per_rank(world: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """One tensor per rank, identical on every rank, so each rank knows what the others hold."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(world)]


def _run(mapping, x: torch.Tensor, grad_out: torch.Tensor, stats: CommStats):
    x = x.clone().requires_grad_()
    y = mapping(x, dist.group.WORLD, stats)
    y.backward(grad_out)
    return y.detach(), x.grad


def _check_mappings(rank: int, world: int) -> None:
    close = {"atol": 1e-5, "rtol": 0}
    xs, gs = _per_rank(world, (B, T, H), 0), _per_rank(world, (B, T, H), 1)

    def mine(t, dim):  # this rank's chunk
        return t.chunk(world, dim)[rank]

    def gathered(ts, dim):  # each rank's own chunk of its own tensor, concatenated
        return torch.cat([t.chunk(world, dim)[r] for r, t in enumerate(ts)], dim)

    n = B * T * H

    # name, input here, upstream grad here, expected output, expected input grad, expected records
    cases = [
        ("copy_to_tp", xs[0], gs[rank], xs[0], sum(gs), {"all_reduce": (1, n)}),
        ("reduce_from_tp", xs[rank], gs[0], sum(xs), gs[0], {"all_reduce": (1, n)}),
        ("scatter_to_tp", xs[0], mine(gs[rank], -1), mine(xs[0], -1), gathered(gs, -1), {"all_gather": (1, n)}),
        ("gather_from_tp", mine(xs[rank], -1), gs[0], gathered(xs, -1), mine(gs[0], -1), {"all_gather": (1, n)}),
        ("scatter_to_seq", xs[0], mine(gs[rank], 1), mine(xs[0], 1), gathered(gs, 1), {"all_gather": (1, n)}),
        ("gather_from_seq", mine(xs[rank], 1), gs[0], gathered(xs, 1), mine(gs[0], 1), {"all_gather": (1, n)}),
        (
            "all_gather_seq", mine(xs[rank], 1), gs[rank], gathered(xs, 1), mine(sum(gs), 1),
            {"all_gather": (1, n), "reduce_scatter": (1, n)},
        ),
        (
            "reduce_scatter_seq", xs[rank], mine(gs[rank], 1), mine(sum(xs), 1), gathered(gs, 1),
            {"reduce_scatter": (1, n), "all_gather": (1, n)},
        ),
    ]  # fmt: skip
    for name, x, grad_out, want_y, want_dx, want_records in cases:
        stats = CommStats()
        y, dx = _run(getattr(M, name), x, grad_out, stats)
        torch.testing.assert_close(y, want_y, **close, msg=f"{name} forward")
        torch.testing.assert_close(dx, want_dx, **close, msg=f"{name} backward")
        got = {kind: (stats[kind].count, stats[kind].elements) for kind in stats.kinds()}
        assert got == want_records, f"{name}: recorded {got}, expected {want_records}"
        for kind in stats.kinds():
            assert stats[kind].bytes == 4 * stats[kind].elements
            assert stats[kind].seconds >= 0.0

    # The input of copy_to_tp's backward is not modified in place (autograd may share it).
    stats = CommStats()
    x = xs[0].clone().requires_grad_()
    g = gs[rank].clone()
    M.copy_to_tp(x, dist.group.WORLD, stats).backward(g)
    torch.testing.assert_close(g, gs[rank], atol=0, rtol=0)

    # A group of one rank: every mapping is the identity and records nothing.
    singles = [dist.new_group([r]) for r in range(world)]
    stats = CommStats()
    for name in ("copy_to_tp", "reduce_from_tp", "all_gather_seq", "reduce_scatter_seq", "scatter_to_tp"):
        x = xs[rank].clone().requires_grad_()
        y = getattr(M, name)(x, singles[rank], stats)
        y.backward(gs[rank])
        torch.testing.assert_close(y, xs[rank], atol=0, rtol=0)
        torch.testing.assert_close(x.grad, gs[rank], atol=0, rtol=0)
    assert stats.kinds() == []


@pytest.mark.parametrize("world", [2, 4])
def test_mappings_forward_backward_and_counts(world):
    run_ranks(_check_mappings, world)
