"""The analytic model for Llama-style shapes (grouped-query attention, SwiGLU, RMSNorm, rotary positions, an
untied head): parameter memory, activations, FLOPs and the planner's ranking of Llama 3 8B and 70B on H100s.
The comparison on llama-tiny is in test_compare.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from conftest import ROOT, child_env, compose_config
from trainer.analysis.formulas import (
    activation_bytes_per_layer,
    shape_activation_bytes,
    shape_flops_per_token,
    split_activations,
    tp_collectives,
    zero_state_bytes,
)
from trainer.analysis.planner.cluster import cluster_spec
from trainer.analysis.planner.config import ClusterConfig
from trainer.analysis.planner.costmodel import block_flops, executed_flops_per_step
from trainer.analysis.planner.layouts import Layout, enumerate_layouts
from trainer.analysis.planner.memory import layer_activation_bytes, memory_per_gpu
from trainer.analysis.planner.predict import make_plan
from trainer.config.validate import validate
from trainer.model.shape import ModelShape

H100 = ClusterConfig(**yaml.safe_load((ROOT / "conf/cluster/h100-sxm.yaml").read_text()))


def _shape(name: str) -> ModelShape:
    return ModelShape.from_config(compose_config([f"model={name}"])[0].model)


LLAMA3_8B, LLAMA3_70B, LLAMA_TINY = _shape("llama3-8b"), _shape("llama3-70b"), _shape("llama-tiny")
GPT3 = ModelShape(96, 12288, 96, 2048, 51200, name="gpt3-175b")


def _layout(tp=1, pp=1, dp=1, zero=0, micro=1, recompute="none", sp=False) -> Layout:
    return Layout(tp, pp, dp, zero, micro, recompute, sp)


# --- parameters ------------------------------------------------------------------------------------------


# (shape, tp, ZeRO stage): every tp that divides the shape's key/value heads (llama-tiny has 2)
PARAMETER_CASES = [
    (shape, tp, zero)
    for shape in (LLAMA3_8B, LLAMA3_70B, LLAMA_TINY)
    for tp, zero in ((1, 0), (2, 1), (8, 3))
    if shape.kv_heads % tp == 0
]


@pytest.mark.parametrize(
    "shape,tp,zero", PARAMETER_CASES, ids=[f"{s.name}-tp{tp}-zero{z}" for s, tp, z in PARAMETER_CASES]
)
def test_parameter_memory_per_rank_is_rank_params(shape, tp, zero):
    """One stage: the planner's weights are 2 bytes (bf16) per parameter of ``rank_params`` (untied head
    counted, no position table), over dp at ZeRO-3."""
    lay = _layout(tp=tp, dp=4, zero=zero)
    mem = memory_per_gpu(shape, lay, 16, "bf16", reserved=0.0, fragmentation=0.0)
    psi = shape.padded(tp).rank_params(tp)
    assert mem.weights == pytest.approx(2 * psi / (4 if zero == 3 else 1), rel=1e-12)
    assert mem.optimizer == pytest.approx(zero_state_bytes(psi, 4, zero, "bf16").optimizer, rel=1e-12)


def test_pipeline_stages_hold_the_embedding_and_the_untied_head():
    s, tp, pp = LLAMA3_70B, 8, 4
    l, h, V = s.n_layer, s.n_embd, s.padded_vocab(tp)
    per = l // pp
    first = s.stage_params(tp, pp, first=True, last=False)
    last = s.stage_params(tp, pp, first=False, last=True)
    assert first == s.padded(tp).rank_params(tp, range(0, 1 + per)) == V * h / tp + per * s.block_params(tp)
    assert last == s.padded(tp).rank_params(tp, range(l - per + 1, l + 3))
    assert last == per * s.block_params(tp) + h + V * h / tp  # blocks, the final RMSNorm, the head's own slice
    # the whole model: embedding and head once each (untied), no position table
    assert s.params() == 70_553_706_496 == 2 * s.vocab_size * h + l * s.block_params() + h


def test_sequence_parallel_all_reduces_the_rmsnorm_weights_only():
    """Llama's replicated parameters are its norms' weights (no biases): 2 per block and 1 final, against
    GPT's 6 and 2."""
    assert LLAMA3_8B.replicated_vectors() == (2, 1) and GPT3.replicated_vectors() == (6, 2)
    l, b, s, h = 4, 2, 32, 64
    sp = tp_collectives(l, b, s, h, 2, sequence_parallel=True, replicated=LLAMA_TINY.replicated_vectors())
    assert sp["all_reduce"][0] == 2 + 3 + 2 * l + 1  # embedding, head, loss's 3, the norms' weights


# --- activations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,sp,scores", [(1, False, True), (8, False, True), (8, True, True), (8, False, False)])
def test_activations_reduce_to_korthikanti_for_gpt(t, sp, scores):
    assert split_activations(GPT3) == 24
    expected = activation_bytes_per_layer(2048, 2, 12288, 96, t, sp, "bf16", scores)
    assert shape_activation_bytes(GPT3, 2, t, sp, "bf16", scores) == pytest.approx(expected, rel=1e-15)


def test_llama3_8b_activations_by_hand():
    """s = 8192, b = 1, h = 4096, a = 32, k = 8, f = 14336, 16-bit, per token in units of h: the 10 tp leaves
    whole, then Q 2, K and V 4·8/32 = 1, the projection's input 2, rotary q and k kept beside the QKV
    output 2·(1 + 8/32) = 2.5, SwiGLU's fc1 output, silu output and product 2·(2f + f + f)/h = 28."""
    sh = 8192 * 4096
    assert split_activations(LLAMA3_8B) == 2 + 1 + 2 + 2.5 + 28 == 35.5
    assert shape_activation_bytes(LLAMA3_8B, 1, scores=False) == sh * 45.5 == 1_526_726_656
    assert shape_activation_bytes(LLAMA3_8B, 1) == sh * (45.5 + 5 * 32 * 8192 / 4096) == 12_264_144_896
    # tp 8: 10 + 35.5/8 without SP, 45.5/8 with it; full recompute keeps the block input (2sbh/t with SP)
    assert layer_activation_bytes(LLAMA3_8B, _layout(tp=8, recompute="selective"), "bf16") == sh * (10 + 35.5 / 8)
    assert layer_activation_bytes(LLAMA3_8B, _layout(tp=8, recompute="selective", sp=True), "bf16") == sh * 45.5 / 8
    assert layer_activation_bytes(LLAMA3_8B, _layout(tp=8, recompute="full", sp=True), "bf16") == 2 * sh / 8


def test_activations_differ_term_by_term_from_gpt():
    """The same sizes as GPT, one architecture change at a time."""
    gpt = ModelShape(4, 4096, 32, 8192, 1000)
    assert split_activations(replace(gpt, n_kv_head=8)) == 24 - 4 + 4 * 8 / 32  # narrower K and V
    assert split_activations(replace(gpt, mlp="swiglu", ffn_hidden=14336)) == 8 + 8 * 3.5  # 4f -> 8f
    assert split_activations(replace(gpt, position="rope")) == 24 + 4  # rotated q and k beside the QKV output
    assert split_activations(replace(gpt, norm="rmsnorm", bias=False, tie_embeddings=False)) == 24


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_activation_formula_against_what_autograd_saves(name):
    """Per block, measured with the trainer's saved-tensor meter on CPU (fp32, dropout 0, fused attention)
    against the formula without scores: within 10 %. GPT: the formula counts two dropout masks that dropout 0
    does not store (-6 %); Llama: also torch's unfused CPU RMSNorm's x·rsqrt and the rotary tables (+6 %).
    Without the rotary term the Llama prediction would be 12 % low."""
    import torch

    from trainer.model import GPT
    from trainer.training.instruments import ActivationMeter

    shape = LLAMA_TINY if name == "llama" else _shape("gpt-tiny")
    shape, b = replace(shape, seq_len=64, vocab_size=512), 2
    peaks = []
    for layers in (1, 2):
        model = GPT(dataclasses.replace(shape, n_layer=layers)).train()
        meter = ActivationMeter(model)
        idx = torch.randint(0, shape.vocab_size, (b, shape.seq_len), generator=torch.Generator().manual_seed(0))
        with meter.track():
            loss = model(idx, idx)
        peaks.append(meter.peak)
        loss.backward()
    predicted = shape_activation_bytes(shape, b, precision="fp32", scores=False)
    assert (peaks[1] - peaks[0]) == pytest.approx(predicted, rel=0.10)


# --- FLOPs --------------------------------------------------------------------------------------------------


def test_llama3_8b_flops_are_six_per_matmul_parameter_plus_attention():
    s = LLAMA3_8B
    l, h, V, seq = s.n_layer, s.n_embd, s.vocab_size, s.seq_len
    assert s.params() == 8_030_261_248
    matmul = s.params() - 2 * V * h - (2 * l + 1) * h  # no embedding, head or norms: the blocks' matrices
    assert matmul == l * (4096 * (32 + 16) * 128 + 4096**2 + 3 * 14336 * 4096)
    assert shape_flops_per_token(s) == 6 * (matmul + V * h) + 12 * l * seq * h
    lay = _layout(tp=8, pp=4, dp=2, micro=2)
    # The head runs over the vocabulary tp=8 builds: 128256 padded to a multiple of 128·8 (1024), 129024.
    executed = 64 * seq * shape_flops_per_token(s, s.padded_vocab(lay.tp))
    assert executed_flops_per_step(s, lay, 64) == pytest.approx(executed, rel=1e-12)
    full = replace(lay, recompute="full")
    assert block_flops(s, full) == pytest.approx(4 / 3 * block_flops(s, lay))


# --- the planner --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,nodes,batch",
    [(LLAMA3_8B, 1, 64), (LLAMA3_8B, 8, 512), (LLAMA3_70B, 8, 512)],
    ids=["8b-8gpus", "8b-64gpus", "70b-64gpus"],
)
def test_the_planner_ranks_llama3_layouts_on_h100s(shape, nodes, batch):
    spec = cluster_spec(replace(H100, nodes=nodes))
    plan = make_plan(shape, spec, batch, "bf16")
    assert len(plan.ranked) >= 5
    speeds = [p.tokens_per_s for p in plan.ranked]
    assert speeds == sorted(speeds, reverse=True)
    for p in plan.ranked:
        assert 0 < p.mfu < 1 and p.memory.total <= spec.mem_bytes
    best = plan.ranked[0]
    cfg, _ = compose_config([f"model={shape.name}", *best.layout.overrides(batch, "bf16")])
    cfg.train.device = "cpu"
    assert validate(cfg, spec.world).grad_accum == best.layout.micro_batches(batch)
    # no layout that holds the whole model unsharded on one GPU fits
    assert not any(p.fits for p in plan.predictions if p.layout.family == (1, 1, 0))


def test_tensor_parallelism_must_divide_the_key_value_heads():
    found = enumerate_layouts(replace(LLAMA_TINY, n_kv_head=2, n_head=8), world=8, gpus_per_node=8, global_batch=8)
    assert {lay.tp for lay in found.layouts} == {1, 2}
    assert "tp=4: does not divide 2 key/value heads" in found.excluded


def test_plan_command_for_llama3_8b(tmp_path):
    cmd = [sys.executable, "-m", "trainer.plan", "model=llama3-8b", "cluster=h100-sxm", "parallel.global_batch=64"]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model llama3-8b: 8.03B parameters (l=32, h=4096, a=32, k=8, f=14336, swiglu, rmsnorm, rope" in done.stdout
    assert "launch/local.sh 8 model=llama3-8b parallel.tp=" in done.stdout
