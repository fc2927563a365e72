"""The analytic model against the papers' own worked numbers and identities."""

from __future__ import annotations

import pytest

from trainer.analysis.formulas import (
    activation_bytes_per_layer,
    dp_comm_bytes_per_step,
    flops_per_token,
    model_state_bytes,
    pipeline_bubble,
    pipeline_p2p_bytes,
    tp_collectives,
    wire_bytes,
    zero_collectives,
    zero_state_bytes,
)
from trainer.model import ModelShape


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
    assert wire_bytes("all_reduce", 100.0, 4) == pytest.approx(150.0)
    assert wire_bytes("all_reduce", 100.0, 1) == 0.0
    assert dp_comm_bytes_per_step(1e6, 2, 3) == pytest.approx(1.5 * dp_comm_bytes_per_step(1e6, 2, 1))
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 8)


def test_gpt3_175b_parameter_count_from_the_formula():
    """Brown et al. 2020: 96 layers, h = 12288, s = 2048, V = 50257 -> 174.6B (published as 175B)."""
    shape = ModelShape(n_layer=96, n_embd=12288, n_head=96, seq_len=2048, vocab_size=50257)
    psi = shape.narayanan_params()
    assert psi / 1e9 == pytest.approx(174.6, abs=0.05)
    assert shape.rank_params() == shape.params() == psi + 2 * 12288  # + the final LayerNorm


def test_zero_states_split_into_master_copy_and_moments():
    mixed = model_state_bytes(1e6, 4, 1, "bf16")
    assert (mixed.master, mixed.states, mixed.optimizer) == (1e6, 2e6, 3e6)  # K = 12 = 4 + 8, over Nd = 4
    fp32 = model_state_bytes(1e6, 4, 1, "fp32")
    assert fp32.master == 0 and fp32.optimizer == 2e6
    assert model_state_bytes(1e6, 4, 1, "fp32", master_copy=True).optimizer == 3e6  # DeepSpeed's ZeRO-1/2
    assert model_state_bytes(1e6, 4, 3, "fp32").params == 1e6


def test_one_master_copy_rule_for_deepspeed():
    """Mixed precision always keeps fp32 master weights; in fp32 only ZeRO-1/2 clone a partition."""
    for stage, master in ((0, 0.0), (1, 1e6), (2, 1e6), (3, 0.0)):
        assert zero_state_bytes(1e6, 4, stage, "fp32").master == master
    assert all(zero_state_bytes(1e6, 4, stage, "bf16").master == 4e6 / (4 if stage else 1) for stage in range(4))


def test_parameters_per_rank_split_over_stages_and_tensor_ranks():
    l, h, V, s = 4, 64, 512, 32
    shape = ModelShape(n_layer=l, n_embd=h, n_head=4, seq_len=s, vocab_size=V)
    whole = shape.rank_params()
    first, last = shape.rank_params(positions=range(0, 3)), shape.rank_params(positions=range(3, 7))
    assert first + last == whole + V * h  # the last stage holds its own copy of the tied embedding
    assert (first, last) == (shape.stage_params(1, 2, True, False), shape.stage_params(1, 2, False, True))
    # tp splits the matrices, replicates LayerNorms, row biases and position embeddings
    assert shape.rank_params(tp=2) == pytest.approx((whole - l * 6 * h - 2 * h - s * h) / 2 + l * 6 * h + 2 * h + s * h)


def test_activation_memory_without_attention_scores_is_the_selective_recomputation_count():
    args = dict(s=2048, b=1, h=12288, a=96)
    assert activation_bytes_per_layer(**args, scores=False) == pytest.approx(2048 * 12288 * 34)
    sp = activation_bytes_per_layer(**args, t=8, sequence_parallel=True, scores=False)
    assert sp == pytest.approx(2048 * 12288 * 34 / 8)


def test_tensor_parallel_collectives_per_micro_batch():
    l, b, s, h = 4, 4, 32, 64
    count, nbytes = tp_collectives(l, b, s, h, 2)["all_reduce"]
    assert count == 4 * l + 5  # 4 per block, embedding, head, 3 in the vocab-parallel loss
    assert nbytes == 4 * ((4 * l + 2) * b * s * h + 3 * b * s)
    sp = tp_collectives(l, b, s, h, 2, sequence_parallel=True)
    assert sp["all_gather"] == (4 * l + 2, (4 * l + 2) * b * s * h * 4)
    assert sp["reduce_scatter"] == (4 * l, 4 * l * b * s * h * 4)
    assert sp["all_reduce"][0] == 2 + 3 + 6 * l + 2
    assert tp_collectives(l, b, s, h, 1) == {}


def test_zero_collectives_and_wire_bytes():
    psi, m = 1e6, 4
    assert zero_collectives(psi, 4, 0, m) == {"all_reduce": 4e6}
    assert zero_collectives(psi, 4, 1, m) == {"all_reduce": 4e6, "all_gather": 4e6}
    assert zero_collectives(psi, 4, 2, m) == {"all_reduce": 16e6, "all_gather": 4e6}
    assert zero_collectives(psi, 4, 3, m) == {"reduce_scatter": 16e6, "all_gather": 16e6}
    assert zero_collectives(psi, 1, 2, m) == {}
    # the paper's 2Ψ: a reduce-scatter plus an all-gather move what one all-reduce moves
    rs_ag = wire_bytes("reduce_scatter", 4e6, 4) + wire_bytes("all_gather", 4e6, 4)
    assert rs_ag == wire_bytes("all_reduce", 4e6, 4) == dp_comm_bytes_per_step(psi, 4, 1)
    assert wire_bytes("send", 10.0, 2) == 10.0 and wire_bytes("recv", 10.0, 2) == 0.0
    assert pipeline_p2p_bytes(2, 8, 4, stage=0, pp=2, micro_batches=3) == 3 * 2 * 8 * 4 * 4
    assert pipeline_p2p_bytes(2, 8, 4, stage=1, pp=3, micro_batches=3) == 2 * 3 * 2 * 8 * 4 * 4
