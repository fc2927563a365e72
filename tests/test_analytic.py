"""The analytic model against the papers' own worked numbers and identities."""

from __future__ import annotations

import pytest

from trainer.analytic import (
    activation_bytes_per_layer,
    dp_comm_bytes_per_step,
    flops_per_token,
    model_state_bytes,
    pipeline_bubble,
    ring_bytes,
)


def test_flops_per_token_is_six_per_parameter_plus_attention():
    l, h, s, V = 24, 2048, 2048, 50257
    assert flops_per_token(l, h, s, V) == pytest.approx(6 * (12 * l * h * h + V * h) + 12 * l * s * h)
    # recomputation adds one forward of the layers (2 of the 6 FLOPs per layer parameter)
    extra = flops_per_token(l, h, s, V, recompute=True) - flops_per_token(l, h, s, V)
    assert extra == pytest.approx(2 * 12 * l * h * h + 4 * l * s * h)


@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_memory_matches_the_paper_example(stage, gb):
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, Nd = 64, K = 12 (mixed precision)."""
    state = model_state_bytes(7.5e9, 64, stage, "bf16")
    assert state.total / 1e9 == pytest.approx(gb, abs=0.06)


def test_fp32_states_are_sixteen_bytes_per_parameter():
    assert model_state_bytes(1e6, 1, 0, "fp32").total == 16e6


def test_activation_memory_formulas_agree_at_t1_and_shrink_with_sp():
    args = dict(s=2048, b=1, h=12288, a=96)
    base = activation_bytes_per_layer(**args)
    assert base == pytest.approx(2048 * 12288 * (34 + 5 * 96 * 2048 / 12288))
    assert activation_bytes_per_layer(**args, t=1, sequence_parallel=True) == pytest.approx(base)
    tp8 = activation_bytes_per_layer(**args, t=8)
    sp8 = activation_bytes_per_layer(**args, t=8, sequence_parallel=True)
    assert sp8 == pytest.approx(base / 8) and base / 8 < tp8 < base


def test_communication_volumes():
    assert ring_bytes(100.0, 4, "all_reduce") == pytest.approx(150.0)
    assert ring_bytes(100.0, 1, "all_reduce") == 0.0
    assert dp_comm_bytes_per_step(1e6, 2, 3) == pytest.approx(1.5 * dp_comm_bytes_per_step(1e6, 2, 1))
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 8)
