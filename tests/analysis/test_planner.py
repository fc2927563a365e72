"""The layout planner (trainer.plan): memory formulas against the papers' examples, enumeration against the
trainer's own validation, predictions against Megatron-LM's published runs, calibration, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, child_env, compose_config
from trainer.analysis.formulas import flops_per_token, zero_state_bytes
from trainer.analysis.planner.calibrate import REQUIRED, fit, read_results, spearman
from trainer.analysis.planner.cluster import cluster_spec, spec_for_world
from trainer.analysis.planner.config import ClusterConfig
from trainer.analysis.planner.costmodel import executed_flops_per_step
from trainer.analysis.planner.layouts import Layout, enumerate_layouts
from trainer.analysis.planner.memory import activation_bytes, layer_activation_bytes
from trainer.analysis.planner.predict import make_plan, predict
from trainer.analysis.planner.published import (
    DEEPSPEED_RUNS,
    FITTED_RUN,
    GPT3_1024_TFLOPS,
    KORTHIKANTI_2022,
    MEGATRON_2021,
    TRAINING_TIME_ESTIMATES,
    check,
    fitted_pipeline_efficiency,
    megatron_2021,
    predict_published,
)
from trainer.analysis.planner.run import compose_plan, preflight
from trainer.config.schema import BadInput, Config, ModelConfig, ParallelConfig
from trainer.config.validate import validate
from trainer.model.shape import ModelShape

GB = 1e9
A100 = ClusterConfig(**yaml.safe_load((ROOT / "conf/cluster/a100-80gb.yaml").read_text()))
GPT3 = ModelShape(96, 12288, 96, 2048, 51200, name="gpt3-175b")
# The acceptance bands (issue #22): predicted TFLOP/s per GPU within 10 % of the published, and the published
# layout within 10 % of the planner's best in Megatron-LM 2021's own option space; and how far down that space
# the published layout may rank (observed worst: 14th, docs/planner.md lists every rank).
BAND, GAP, TOP_K = 0.10, 0.10, 15
# Rows whose published layout the planner predicts more than GAP slower than its best (docs/planner.md, "Where the
# planner disagrees with the paper"): tp4·pp4, which the paper did not run, is predicted faster.
GAP_MISSES = {"39.1B on 512 GPUs (Table 1)": 0.123}
# DeepSpeed-engine runs predicted further than BAND from the published TFLOP/s (docs/planner.md, "DeepSpeed's
# engine"): BLOOM ran its slots faster than MT-NLG's engine, whose efficiency the cluster files state.
BAND_MISSES = {"176B on 384 GPUs (BLOOM)": -0.101}


# --- memory formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_model_states_match_the_zero_paper(stage, gb):
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B on Nd = 64 GPUs, K = 12 (mixed precision)."""
    assert zero_state_bytes(7.5e9, 64, stage, "bf16").total / GB == pytest.approx(gb, abs=0.06)


def test_fp32_zero_keeps_a_master_copy():
    assert zero_state_bytes(1e9, 1, 0, "fp32").total == 16e9
    assert zero_state_bytes(1e9, 4, 1, "fp32").optimizer == pytest.approx((8e9 + 4e9) / 4)


def _layout(tp=8, pp=1, dp=1, zero=0, micro=1, recompute="none", sp=False) -> Layout:
    return Layout(tp, pp, dp, zero, micro, recompute, sp)


def test_activations_per_layer_follow_korthikanti():
    """Korthikanti et al. 2022, Table 2, 16-bit, per layer: s=2048, b=1, h=12288, a=96, t=8."""
    s, h, t, attn = 2048, 12288, 8, 5 * 96 * 2048 / 12288
    sbh = s * h
    cases = {
        ("none", False): sbh * (10 + 24 / t + attn / t),
        ("none", True): sbh / t * (34 + attn),
        ("selective", False): sbh * (10 + 24 / t),
        ("selective", True): sbh * 34 / t,
        ("full", False): 2 * sbh,
        ("full", True): 2 * sbh / t,
    }
    for (recompute, sp), expected in cases.items():
        got = layer_activation_bytes(GPT3, _layout(recompute=recompute, sp=sp), "bf16")
        assert got == pytest.approx(expected), (recompute, sp)
    assert layer_activation_bytes(GPT3, _layout(tp=1), "bf16") == pytest.approx(sbh * (34 + attn))


def test_only_megatrons_attention_keeps_the_scores():
    """This trainer's fused attention (scaled_dot_product_attention) keeps no s×s scores, so recompute "none"
    needs what "selective" needs on its engine; Megatron-LM 2021's softmax keeps them: 5as/h·sbh/t per block."""
    from trainer.analysis.planner.memory import memory_per_gpu
    from trainer.analysis.planner.stages import keeps_attention_scores

    per_block = 2048 * 12288 * (5 * 96 * 2048 / 12288) / 8
    for engine, extra in (("deepspeed", 0.0), ("megatron", GPT3.n_layer * per_block)):
        scores, partition = keeps_attention_scores(engine), "even" if engine == "megatron" else "parameters"
        none, selective = (
            memory_per_gpu(GPT3, _layout(recompute=r), 8, "bf16", 0.0, 0.0, partition=partition, scores=scores)
            for r in ("none", "selective")
        )
        assert none.activations - selective.activations == pytest.approx(extra), engine
    # and the memory-bound time: without scores there is no softmax traffic to move, nor any to recompute
    from trainer.analysis.planner.costmodel import elementwise_bytes

    traffic = {
        (r, kept): elementwise_bytes(GPT3, _layout(recompute=r), "bf16", scores=kept)
        for r in ("none", "selective")
        for kept in (True, False)
    }
    assert traffic["none", False] == traffic["selective", False] < traffic["none", True] < traffic["selective", True]
    with pytest.raises(ValueError, match="engine"):
        keeps_attention_scores("fairseq")


def test_memory_matches_the_h200_run():
    """The planner against the H200 run recorded in docs/gpu.md (benchmarks/gpu_check.sh, 2026-11-26):
    gpt3-1.3b (vocabulary 50,304), bf16, seq 2048, micro 2 x accumulation 4, ZeRO-0, flash attention; the run
    logged 30.08 GB at the CUDA allocator's peak and 7.31 GB of activations. The planner's allocated memory
    (model states + activations; its margin covers the allocator's slack and the CUDA context) is within 10%."""
    files = [yaml.safe_load((ROOT / f"conf/cluster/{name}.yaml").read_text()) for name in ("h100-sxm", "h200")]
    assert files[1].pop("defaults") == ["h100-sxm", "_self_"]  # h200.yaml overrides the H100 file
    h200 = cluster_spec(replace(ClusterConfig(**{**files[0], **files[1]}), nodes=1, gpus_per_node=1))
    shape = ModelShape(24, 2048, 16, 2048, 50257, name="gpt3-1.3b").padded()
    memory = predict(shape, _layout(tp=1, micro=2), 8, "bf16", h200).memory
    assert memory.total - memory.margin == pytest.approx(30.08 * GB, rel=0.10)
    assert memory.activations == pytest.approx(7.31 * GB, rel=0.10)


def test_first_pipeline_stage_holds_p_micro_batches():
    one = layer_activation_bytes(GPT3, _layout(pp=4, sp=True), "bf16")
    first = activation_bytes(GPT3, _layout(pp=4, sp=True), 64, "bf16", first=True)
    last = activation_bytes(GPT3, _layout(pp=4, sp=True), 64, "bf16", first=False)
    blocks = GPT3.n_layer // 4
    assert first == pytest.approx(4 * blocks * one, rel=0.01)  # + the embedding's dropout mask
    assert last == pytest.approx(blocks * one + 4 * 2048 * 12288 / 8 * (1 + 51200 / 12288))
    # fewer micro-batches than stages: only those are in flight
    assert activation_bytes(GPT3, _layout(pp=4, sp=True, micro=32), 64, "bf16", first=True) < 3 * 32 * blocks * one


def test_executed_flops_are_narayanans_formula():
    l, h, s, V, B = 96, 12288, 2048, 51200, 64
    per_token = {"none": flops_per_token(l, h, s, V), "full": flops_per_token(l, h, s, V, recompute=True)}
    for recompute, expected in per_token.items():
        got = executed_flops_per_step(GPT3, _layout(tp=8, pp=4, dp=2, micro=2, recompute=recompute), B)
        assert got == pytest.approx(B * s * expected)


# --- enumeration ---------------------------------------------------------------------------------------------


def _check_layouts(shape: ModelShape, nodes: int, per_node: int, batch: int) -> int:
    spec = cluster_spec(replace(A100, nodes=nodes, gpus_per_node=per_node))
    plan = make_plan(shape, spec, batch, "bf16")
    world, model = (
        spec.world,
        ModelConfig(shape.name, shape.n_layer, shape.n_embd, shape.n_head, shape.seq_len, shape.vocab_size),
    )
    for p in plan.predictions:
        lay = p.layout
        assert lay.tp * lay.pp * lay.dp == world and per_node % lay.tp == 0 and shape.n_head % lay.tp == 0
        assert lay.pp <= shape.n_layer and batch % (lay.micro_batch * lay.dp) == 0  # uneven stages run
        assert not (lay.pp > 1 and lay.zero_stage > 1) and not (lay.sequence_parallel and lay.tp == 1)
        if p.fits:
            parallel = ParallelConfig(
                tp=lay.tp,
                pp=lay.pp,
                sequence_parallel=lay.sequence_parallel,
                zero_stage=lay.zero_stage,
                micro_batch=lay.micro_batch,
                global_batch=batch,
                precision="bf16",
                recompute=lay.recompute,
            )
            cfg = Config(model=model, parallel=parallel)
            cfg.train.device = "cpu"
            assert validate(cfg, world).grad_accum == lay.micro_batches(batch)
    return len(plan.ranked)


@pytest.mark.parametrize(
    "shape,nodes,per_node,batch",
    [
        (GPT3, 16, 8, 512),
        (ModelShape(24, 1600, 25, 1024, 50257, name="gpt2-xl"), 1, 8, 48),  # 25 heads: only tp 1
        (ModelShape(105, 20480, 128, 2048, 51200, name="530B"), 35, 8, 280),  # 105 layers: pp 1, 5, 7, 35
        (ModelShape(4, 256, 4, 256, 8192, name="tiny"), 1, 4, 8),
    ],
)
def test_every_fitting_layout_passes_the_trainers_validation(shape, nodes, per_node, batch):
    assert _check_layouts(shape, nodes, per_node, batch) > 0


def test_enumeration_refuses_what_the_trainer_refuses():
    found = enumerate_layouts(ModelShape(6, 384, 6, 99, 1000), world=8, gpus_per_node=8, global_batch=4)
    degrees = {(lay.tp, lay.pp, lay.dp) for lay in found.layouts}
    assert all(tp in (1, 2) for tp, _, _ in degrees)  # 4 and 8 do not divide 6 heads
    assert (2, 2, 2) in degrees and (1, 2, 4) in degrees and (1, 1, 8) not in degrees  # dp 8 does not divide 4
    assert not any(lay.sequence_parallel for lay in found.layouts)  # 99 tokens do not split over tp 2
    assert any("does not divide 6 heads" in note for note in found.excluded)
    assert (1, 4, 2) in degrees  # 6 layers over 4 stages: DeepSpeed's partitioner cuts them unevenly
    assert any("pp=8: more stages than 6 layers" in note for note in found.excluded)
    # Megatron-LM's even split (the published runs' engine) needs pp to divide the layers
    even = enumerate_layouts(ModelShape(6, 384, 6, 99, 1000), world=8, gpus_per_node=8, global_batch=4, method="even")
    assert all(lay.pp in (1, 2) for lay in even.layouts)
    assert any("pp=4: does not divide 6 layers" in note for note in even.excluded)


def test_the_override_line_composes_and_validates():
    spec = cluster_spec(replace(A100, nodes=2))
    plan = make_plan(ModelShape.from_config(compose_config(["model=gpt3-13b"])[0].model), spec, 64, "bf16")
    best = plan.ranked[0]
    cfg, _ = compose_config(["model=gpt3-13b", "train.device=cpu", *best.layout.overrides(64, "bf16")])
    assert validate(cfg, spec.world).grad_accum == best.layout.micro_batches(64)


# --- published runs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", MEGATRON_2021, ids=lambda r: r.name)
def test_published_megatron_runs(run):
    """Narayanan et al. 2021 (Tables 1 and 2), predicted as Megatron-LM's engine: the published layout fits, its
    predicted TFLOP/s per GPU is within 10% of the measured one, and it ranks among the first TOP_K of the layouts
    Megatron-LM 2021 could run."""
    result = check(run, A100)
    assert result.predicted_tflops is not None, "the published layout does not fit in the plan"
    assert abs(result.error) <= BAND, f"predicted {result.predicted_tflops:.1f} vs {run.tflops_per_gpu}"
    assert result.rank <= TOP_K, f"rank {result.rank} of {result.candidates}"


@pytest.mark.parametrize("run", MEGATRON_2021, ids=lambda r: r.name)
def test_published_layout_is_near_the_planners_best(run):
    """The published layout within 10% of the planner's best of the paper's option space, every row but the two
    the planner disagrees on; those are held to what they are, so a change to the model shows here."""
    gap = check(run, A100).gap
    if run.name in GAP_MISSES:
        assert gap == pytest.approx(GAP_MISSES[run.name], abs=0.01)
    else:
        assert gap <= GAP, f"the published layout is predicted {gap:.1%} slower than the planner's best"


# --- DeepSpeed's pipeline engine: MT-NLG 530B and BLOOM 176B (published.DEEPSPEED_RUNS) -------------------------


def _error(run, cluster) -> float:
    return predict_published(run, cluster).hw_tflops_per_gpu / run.tflops_per_gpu - 1


def test_pipeline_efficiency_is_the_one_fitted_on_mtnlg():
    """conf/cluster/a100-80gb.yaml's pipeline_efficiency is what MT-NLG's 350-node row gives (0.78)."""
    assert FITTED_RUN.gpus == 2800 and FITTED_RUN.source == "MT-NLG"
    assert fitted_pipeline_efficiency(FITTED_RUN, A100) == pytest.approx(A100.pipeline_efficiency, abs=0.005)


@pytest.mark.parametrize("run", DEEPSPEED_RUNS, ids=lambda r: r.name)
def test_deepspeed_engine_runs_are_predicted_within_the_band(run):
    """The published layout fits (BLOOM: 70 layers over 12 stages, which DeepSpeed's partitioner cuts unevenly;
    GPT-NeoX on 40 GB GPUs) and its predicted TFLOP/s per GPU is within 10 % of the published, but for the
    misses the docs state; the rows other than the fitted one (BLOOM and GPT-NeoX: other clusters, models,
    micro-batches, precisions) are out of sample."""
    assert predict_published(run, A100).fits
    if run.name in BAND_MISSES:
        assert _error(run, A100) == pytest.approx(BAND_MISSES[run.name], abs=0.01)
    else:
        assert abs(_error(run, A100)) <= BAND, f"{_error(run, A100):+.1%}"


def test_the_runs_before_flash_attention_are_predicted_with_their_kernel():
    """DeepSpeed's engine with the s×s scores in memory, as these runs computed attention, is slower than with
    this trainer's fused kernels; GPT-NeoX (h 6144, 64 heads: the scores are most of its activations) is over-
    predicted by more than the band with the fused kernels' traffic."""
    for run in DEEPSPEED_RUNS:
        assert run.attention == "materialized"
        fused = replace(run, attention="fused")
        assert predict_published(fused, A100).time.total < predict_published(run, A100).time.total
    neox = next(run for run in DEEPSPEED_RUNS if run.source == "GPT-NeoX")
    assert _error(replace(neox, attention="fused"), A100) > BAND


@pytest.mark.parametrize("run", DEEPSPEED_RUNS, ids=lambda r: r.name)
def test_megatrons_slots_overpredict_deepspeeds_engine(run):
    """Predicted as Megatron-LM's engine runs them (pipeline_efficiency 1), every DeepSpeed run is over-predicted by
    more than the band (+12 % to +29 %): what the engine term is for."""
    assert _error(run, replace(A100, pipeline_efficiency=1.0)) > BAND


def _korthikanti_mfu(published) -> float:
    run = published.run
    layout = Layout(run.tp, run.pp, run.dp, 0, run.micro_batch, published.recompute, published.sequence_parallel)
    prediction = predict(run.shape(), layout, run.global_batch, run.precision, cluster_spec(run.cluster(A100)))
    assert prediction.fits
    return prediction.mfu


@pytest.mark.parametrize("published", KORTHIKANTI_2022, ids=lambda p: p.recompute)
def test_selective_recompute_and_sequence_parallelism_as_published(published):
    """Korthikanti et al. 2022's 530B on 2240 GPUs: the predicted MFU within the band of the published, with full
    recomputation and with SP + selective recomputation (out of sample: nothing was fitted to it)."""
    assert abs(_korthikanti_mfu(published) / published.mfu - 1) <= BAND


def test_selective_recompute_gains_what_the_paper_measured():
    """The paper's gain of SP + selective over full recomputation (54.2 / 42.1 = 1.29x), within the band."""
    full, selective = KORTHIKANTI_2022
    predicted = _korthikanti_mfu(selective) / _korthikanti_mfu(full)
    assert abs(predicted / (selective.mfu / full.mfu) - 1) <= BAND


def test_bloom_is_planned_on_its_uneven_stages():
    """BLOOM's layout is among the planner's own candidates for its model, batch and 48 nodes."""
    bloom = next(run for run in DEEPSPEED_RUNS if run.source == "BLOOM")
    plan = make_plan(bloom.shape(), cluster_spec(bloom.cluster(A100)), bloom.global_batch, "bf16")
    assert any((p.layout.tp, p.layout.pp, p.layout.dp) == (4, 12, 8) for p in plan.ranked)


@pytest.mark.parametrize("run", [r for r in DEEPSPEED_RUNS if r.iteration_s], ids=lambda r: r.name)
def test_mtnlg_iteration_time_gives_its_tflops(run):
    """The paper's own arithmetic: eq. (3)'s FLOPs per iteration over its iteration time and GPUs is its TFLOP/s,
    within 1 % (the rounding of both columns)."""
    s, V, B, l, h = 2048, run.vocab, run.global_batch, run.n_layer, run.hidden
    flops = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert flops / (run.gpus * run.iteration_s) / 1e12 == pytest.approx(run.tflops_per_gpu, rel=0.01)


@pytest.mark.parametrize("engine,precision,nbytes", [("megatron", "fp16", 2), ("megatron", "bf16", 4),
                                                      ("deepspeed", "bf16", 2), ("deepspeed", "fp32", 4)])  # fmt: skip
def test_gradient_reductions_move_the_engines_dtype(engine, precision, nbytes):
    """Megatron-LM 2021 reduces fp16 gradients in fp16 (its paper's scripts leave
    --accumulate-allreduce-grads-in-fp32 off) and forces fp32 under bf16; DeepSpeed reduces the model's dtype."""
    from trainer.analysis.planner.costmodel import grad_comm_bytes

    assert grad_comm_bytes(cluster_spec(replace(A100, engine=engine)), precision) == nbytes


@pytest.mark.parametrize("zero,micro", [(0, 1), (1, 1), (0, 16), (1, 16)])
def test_an_overlapped_gradient_reduction_costs_what_outlasts_the_last_backward(zero, micro):
    """cluster.overlap_grad_reduce (torch DDP): the reduction hides behind the last micro-batch's backward (3/4 of
    its compute under full recompute); ZeRO-1's all-gather of the updated weights, after the step, does not."""
    from trainer.analysis.planner.costmodel import dp_step_time, grad_comm_bytes, stage_compute, step_time

    shape, layout = GPT3, _layout(tp=8, pp=1, dp=16, zero=zero, micro=micro, recompute="full")
    spec = cluster_spec(replace(A100, nodes=16, engine="megatron"))
    hiding = cluster_spec(replace(A100, nodes=16, engine="megatron", overlap_grad_reduce=True))
    psi = shape.padded(8).rank_params(8, range(shape.n_layer + 3))
    whole = dp_step_time(layout, psi, "fp16", spec, grad_comm_bytes(spec, "fp16"))
    gather = dp_step_time(layout, psi, "fp16", spec, 2, hidden=float("inf"))
    assert (gather > 0) == (zero == 1)  # nothing hides ZeRO-1's all-gather
    window = 0.75 * stage_compute(shape, layout, "fp16", spec, last=True)
    before, after = step_time(shape, layout, 256, "fp16", spec), step_time(shape, layout, 256, "fp16", hiding)
    assert before.dp_comm == pytest.approx(whole)
    assert after.dp_comm == pytest.approx(gather + max(0.0, whole - gather - window))
    assert (whole - gather > window) == (micro == 1)  # one sample's backward is too short to hide it all
    assert after.total == pytest.approx(before.total - before.dp_comm + after.dp_comm)


def test_the_interleaved_schedule_divides_the_bubble_and_multiplies_the_sends():
    """Megatron-LM's interleaved 1F1B with v chunks per stage (Narayanan et al. 2021, Section 2.2.2): bubble
    (p - 1)/(v·m), v times the p2p sends, and the first stage's activations times 1 + (p - 1)/(p·v) (Korthikanti et
    al. 2022); where the layers or micro-batches do not divide, the layout keeps the plain schedule."""
    from trainer.analysis.planner.costmodel import step_time
    from trainer.analysis.planner.layouts import interleave

    spec = cluster_spec(replace(A100, nodes=128, engine="megatron"))
    plain = _layout(tp=8, pp=4, dp=32, micro=2, recompute="full")  # 76.1B's row: m = 1792 / (32·2) = 28
    shape = next(r for r in MEGATRON_2021 if r.params_b == 76.1).shape()
    chunked = interleave(plain, shape, 1792, 3)
    assert chunked.virtual_stages == 3 and interleave(plain, shape, 1792, 7).virtual_stages == 1  # 15 layers a stage
    assert interleave(plain, shape, 1792 - 64, 3).virtual_stages == 1  # m = 27 is not a multiple of pp
    one, three = (step_time(shape, lay, 1792, "fp16", spec) for lay in (plain, chunked))
    assert one.bubble == pytest.approx(3 / 28) and three.bubble == pytest.approx(3 / (3 * 28))
    assert three.pp_comm / (28 + 1) == pytest.approx(3 * one.pp_comm / (28 + 3))  # per slot, v times the sends
    assert three.compute / (28 + 1) == pytest.approx(one.compute / (28 + 3))  # the same work per slot, fewer slots
    grow = activation_bytes(shape, chunked, 1792, "fp16", True) - activation_bytes(shape, plain, 1792, "fp16", True)
    blocks = 4 * 15 * layer_activation_bytes(shape, plain, "fp16")  # the first stage: 4 micro-batches of 15 blocks
    assert grow == pytest.approx(blocks * 3 / (4 * 3))


def test_gpt3_on_1024_gpus_matches_the_papers_estimate():
    """Section 5.1: 140 TFLOP/s per GPU for GPT-3 175B on 1024 A100s at batch 1536 in fp16 (no layout given): the
    fastest layout of the paper's rule (tensor parallelism over the node's 8 GPUs, then pipeline stages)."""
    spec = cluster_spec(replace(A100, nodes=128, engine="megatron"))
    rule = next(p for p in make_plan(GPT3, spec, 1536, "fp16").ranked if megatron_2021(p) and p.layout.tp == 8)
    assert abs(rule.hw_tflops_per_gpu / GPT3_1024_TFLOPS - 1) <= BAND


# --- the paper's own arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("run", [r for r in MEGATRON_2021 if r.aggregate_pflops], ids=lambda r: r.name)
def test_table1_aggregate_is_gpus_times_per_gpu(run):
    """Table 1's two throughput columns agree: aggregate petaFLOP/s = GPUs × TFLOP/s per GPU, within the
    rounding of both (per GPU to 0.5 TFLOP/s, the aggregate to 0.05 PFLOP/s)."""
    per_gpu = run.aggregate_pflops * 1000 / run.gpus
    assert abs(per_gpu - run.tflops_per_gpu) <= 0.5 + 50 / run.gpus


@pytest.mark.parametrize("run", MEGATRON_2021, ids=lambda r: r.name)
def test_eq3_is_the_planners_flop_count_and_gives_the_iteration_time(run):
    """The paper's eq. (3), F = 96·B·s·l·h²(1 + s/6h + V/16lh) per iteration (full recompute), is what the planner
    counts as executed (formulas.flops_per_token with recompute), and F / (n·X) is the iteration time the
    published TFLOP/s implies; the planner's prediction of the published layout lies within BAND of it."""
    s, V, B, l, h = 2048, 51200, run.global_batch, run.n_layer, run.hidden
    eq3 = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert B * s * flops_per_token(l, h, s, V, recompute=True) == pytest.approx(eq3, rel=1e-12)
    implied = eq3 / (run.gpus * run.tflops_per_gpu * 1e12)
    predicted = eq3 / (run.gpus * check(run, A100).predicted_tflops * 1e12)
    assert 1 / (1 + BAND) <= predicted / implied <= 1 / (1 - BAND), (implied, predicted)


@pytest.mark.parametrize("estimate", TRAINING_TIME_ESTIMATES, ids=lambda e: f"{e.params:.0e} params")
def test_section_5_1_training_times_follow_eq4(estimate):
    """Section 5.1's end-to-end training times (GPT-3: 300B tokens on 1024 GPUs at 140 TFLOP/s, about 34 days;
    1T: 450B tokens on 3072 GPUs at 163 TFLOP/s, about 84 days) by eq. (4), 8·T·P / (n·X), and eq. (4)'s 8·P per
    token is eq. (3)'s count to within its small terms (s/6h, V/16lh) for GPT-3."""
    e = estimate
    seconds = 8 * e.tokens * e.params / (e.gpus * e.tflops_per_gpu * 1e12)
    assert seconds / 86400 == pytest.approx(e.days, abs=1.0)
    per_token = flops_per_token(96, 12288, 2048, 51200, recompute=True)
    assert per_token / (8 * 174.6e9) == pytest.approx(1.0, abs=0.06)


# --- calibration ---------------------------------------------------------------------------------------------

TINY = ModelShape(4, 256, 4, 256, 8192, name="gpt-tiny")
SMALL_CPU = replace(
    A100,
    name="test-cpu",
    gpus_per_node=4,
    shared=True,
    mem_per_gpu_gb=24,
    peak_tflops_fp32=0.35,
    mem_bw_gbs=15,
    intra_node_bw_gbs=1,
    inter_node_bw_gbs=1,
    comm_efficiency=1.0,
    reserved_gb=0.5,
)
LAYOUTS = [
    _layout(1, 1, 2, 0, 4),
    _layout(1, 1, 2, 2, 4),
    _layout(2, 1, 1, 0, 4, sp=True),
    _layout(1, 2, 1, 0, 2),
    _layout(2, 2, 1, 1, 2),
    _layout(1, 1, 4, 3, 2),
]


def _fabricate(tmp_path: Path, efficiency: float, columns=REQUIRED + ("micro_batch",)) -> Path:
    """A results.csv as trainer.compare writes it, with numbers from the planner itself at a known efficiency."""
    rows = []
    for lay in LAYOUTS:
        spec = spec_for_world(SMALL_CPU, lay.tp * lay.pp * lay.dp).with_efficiency(efficiency, 1.0)
        p = predict(TINY, lay, 8, "fp32", spec)
        rows.append(
            {
                "tp": lay.tp,
                "pp": lay.pp,
                "dp": lay.dp,
                "zero_stage": lay.zero_stage,
                "sequence_parallel": str(lay.sequence_parallel).lower(),
                "micro_batch": lay.micro_batch,
                "tokens_per_s": p.tokens_per_s,
                "peak_mem_mb": (p.memory.total - 0.5e9 + 0.4e9) / 2**20,
            }
        )
    with (tmp_path / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_calibration_recovers_the_efficiency_it_was_made_with(tmp_path):
    measured = read_results(str(_fabricate(tmp_path, 0.2)), 8, "fp32")
    result = fit(TINY, lambda world: spec_for_world(SMALL_CPU, world), measured)
    assert result.compute_efficiency == pytest.approx(0.2, rel=0.1)
    assert result.spearman == pytest.approx(1.0)
    assert result.runtime_bytes == pytest.approx(0.4e9, rel=0.01) and result.mean_abs_mem_error < 0.01


def test_calibration_names_missing_columns(tmp_path):
    _fabricate(tmp_path, 0.2, columns=("tp", "pp", "dp", "tokens_per_s"))
    with pytest.raises(BadInput, match="zero_stage, sequence_parallel, peak_mem_mb"):
        read_results(str(tmp_path), 8, "fp32")


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1], [1, 2]) is None


# --- command line --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,key",
    [
        (["cluster=dgx-b300"], "cluster="),
        (["cluster=dgx-a100", "cluster.nodes=0"], "cluster.nodes"),
        (["model=gpt3-175b", "cluster=dgx-a100", "cluster.nodes=128", "train.global_batch=1537"], "train.global_batch"),
        (
            ["model=gpt3-175b", "cluster=dgx-a100", "cluster.nodes=128", "parallel.global_batch=5"],
            "parallel.global_batch",
        ),
        (["cluster=a100-80gb", "train.global_batch=16", "parallel.global_batch=32"], "train.global_batch"),
        (["cluster=a100-80gb", "parallel.precision=fp8"], "parallel.precision"),
        (["cluster=a100-80gb", "plan.calibrate=/nonexistent"], "plan.calibrate"),
        (["cluster.gpus=4"], "cluster.gpus"),
        (["cluster=a100-80gb", "cluster.pipeline_efficiency=1.3"], "cluster.pipeline_efficiency"),
        (["cluster=a100-80gb", "parallel.virtual_stages=2"], "parallel.virtual_stages"),  # DeepSpeed's engine
        (["cluster=a100-80gb", "cluster.engine=megatron", "parallel.virtual_stages=0"], "parallel.virtual_stages"),
        (["cluster=a100-80gb", "cluster.attention=flash"], "cluster.attention"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, key, capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and key in err, err


_TABLE1_18B = [
    "model=gpt3-13b", "model.n_layer=40", "model.n_embd=6144", "model.n_head=48", "model.vocab_size=51200",
    "model.seq_len=2048", "cluster=a100-80gb", "cluster.nodes=32", "cluster.engine=megatron",
    "parallel.global_batch=1024",
]  # fmt: skip


@pytest.mark.parametrize(
    "pinned,key,why",
    [
        (["parallel.pp=16"], "parallel.pp", "does not divide 40 layers"),
        (["parallel.tp=3"], "parallel.tp", "possible: 1, 2, 4, 8"),
        (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage", "together with pp=2"),
        (["parallel.tp=1", "parallel.sequence_parallel=true"], "parallel.sequence_parallel", "together with tp=1"),
        (["parallel.micro_batch=3"], "parallel.micro_batch", "possible: 1, 2, 4"),
        (["parallel.recompute=most"], "parallel.recompute", "none, selective, full"),
        (["parallel.zero_stage=4"], "parallel.zero_stage", "0, 1, 2 or 3"),
        (["parallel.tp=0"], "parallel.tp", ">= 1"),
    ],
)
def test_a_pinned_degree_no_layout_has_is_one_line_and_exit_2(pinned, key, why, capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(_TABLE1_18B + pinned)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"{key}=" in err and why in err, err


def test_pinned_degrees_rank_the_layouts_that_have_them(tmp_path):
    """Table 1's 18.4B row as its authors ran it (tp8, pp1, no ZeRO, full recompute, no SP, micro-batch 8, fp16,
    torch DDP): the plan ranks it against the best of all layouts and gives its TFLOP/s as the paper counts them
    (recompute included), the prediction the published-run check makes."""
    from trainer.analysis.planner.published import MEGATRON_2021, check

    out = tmp_path / "plan.json"
    pinned = ["parallel.tp=8", "parallel.pp=1", "parallel.zero_stage=0", "parallel.recompute=full",
              "parallel.sequence_parallel=false", "parallel.micro_batch=8", "parallel.precision=fp16",
              "cluster.overlap_grad_reduce=true"]  # fmt: skip
    cmd = [sys.executable, "-m", "trainer.plan", *_TABLE1_18B, *pinned, f"plan.out={out}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    want = {"tp": 8, "pp": 1, "zero_stage": 0, "micro_batch": 8, "recompute": "full", "sequence_parallel": False}
    assert record["meta"]["pinned"] == want
    mine = [lay for lay in record["layouts"] if all(lay[k] == v for k, v in want.items())]
    fitting = sorted((lay for lay in mine if lay["fits"]), key=lambda lay: lay["rank"])
    assert len(mine) == 1 and fitting and fitting[0]["rank"] > 1
    best = max(lay["tokens_per_s"] for lay in record["layouts"] if lay["fits"])
    gap = 1 - fitting[0]["tokens_per_s"] / best
    line = next(line for line in done.stdout.splitlines() if line.startswith("the fastest of them ranks"))
    assert f"ranks {fitting[0]['rank']} of " in line and f"{gap:.1%} slower than #1" in line, line
    run = next(r for r in MEGATRON_2021 if r.name == "18.4B on 256 GPUs (Table 1)")
    published = check(run, compose_plan(["cluster=a100-80gb"]).cluster).predicted_tflops
    assert fitting[0]["hw_tflops_per_gpu"] == pytest.approx(published, rel=1e-9)
    assert f"{published:.3g} TFLOP/s per GPU counting recompute" in line


def test_a_published_deepspeed_run_is_checked_from_the_command_line():
    """GPT-NeoX-20B as a user states it (its shape, conf/cluster/a100-40gb.yaml with its 12 nodes and NICs, attention
    as it computed it, its layout pinned): the plan's TFLOP/s for it, recompute counted, is the published-run
    check's, within the band of the published 117."""
    neox = next(run for run in DEEPSPEED_RUNS if run.source == "GPT-NeoX")
    argv = [
        "model=gpt3-13b", "model.n_layer=44", "model.n_embd=6144", "model.n_head=64", "model.vocab_size=50432",
        "model.tie_embeddings=false", "model.position=rope", "cluster=a100-40gb", "cluster.nodes=12",
        "cluster.inter_node_bw_gbs=12.5", "cluster.attention=materialized", "parallel.global_batch=1536",
        "parallel.tp=2", "parallel.pp=4", "parallel.zero_stage=1", "parallel.micro_batch=4", "parallel.recompute=full",
        "parallel.sequence_parallel=false", "parallel.precision=fp16",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "trainer.plan", *argv], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("the fastest of them ranks"))
    predicted = predict_published(neox, A100).hw_tflops_per_gpu
    assert f"{predicted:.3g} TFLOP/s per GPU counting recompute" in line, (line, predicted)
    assert abs(predicted / neox.tflops_per_gpu - 1) <= BAND


def test_train_global_batch_is_an_alias():
    cfg = compose_plan(["model=gpt3-175b", "cluster=dgx-a100", "train.global_batch=1536"])
    from trainer.analysis.planner.config import global_batch

    assert global_batch(cfg) == 1536 and cfg.cluster.gpus_per_node == 8 and cfg.cluster.mem_per_gpu_gb == 85.0


def test_the_issue_example_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [
        sys.executable,
        "-m",
        "trainer.plan",
        "model=gpt3-175b",
        "cluster=dgx-a100",
        "cluster.nodes=128",
        "train.global_batch=1536",
        f"plan.out={out}",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "launch/slurm.sbatch model=gpt3-175b parallel.tp=" in done.stdout
    assert "tp2 pp1: ZeRO-0 1." in done.stdout  # a rejected family with its need, in TB
    layouts = json.loads(out.read_text())["layouts"]
    keys = {
        "tp",
        "pp",
        "dp",
        "zero_stage",
        "micro_batch",
        "recompute",
        "sequence_parallel",
        "fits",
        "mem_per_gpu_gb",
        "step_time_s",
        "tflops_per_gpu",
        "mfu",
        "rank",
    }
    assert all(keys <= set(layout) for layout in layouts)
    ranks = sorted(layout["rank"] for layout in layouts if layout["fits"])
    assert ranks == list(range(1, len(ranks) + 1)) and all(lay["rank"] is None for lay in layouts if not lay["fits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # Hydra wrote nothing else


def test_calibrate_from_the_command_line(tmp_path):
    report = _fabricate(tmp_path, 0.3)
    cmd = [sys.executable, "-m", "trainer.plan", "model=gpt-tiny", "cluster=a100-80gb", f"plan.calibrate={report}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Spearman rho = " in done.stdout and "fitted: cluster.compute_efficiency=" in done.stdout


# --- time-shared CPU terms --------------------------------------------------------------------------------


def test_rank_cap_counts_the_threads_one_time_shared_rank_can_use():
    from trainer.analysis.planner.cluster import rank_cap

    assert rank_cap(ranks=2, cores=2) == 1.0  # a core each: no spare capacity to borrow
    assert rank_cap(ranks=4, cores=2) == 2.0  # 1 thread each; alone it runs at 1/2 of the machine, twice its 1/4
    assert rank_cap(ranks=4, cores=0) == 1.0  # unknown cores


def test_collective_call_latency_costs_each_call_once():
    from trainer.analysis.planner.cluster import Link
    from trainer.analysis.planner.costmodel import ring_time

    link = Link(bandwidth=1e9, latency=0.0)
    base = ring_time(1e6, 4, "all_reduce", link)
    assert base == pytest.approx(2 * 3 / 4 * 1e6 / 1e9)
    assert ring_time(1e6, 4, "all_reduce", link, call_latency=0.003) == pytest.approx(base + 0.003)
    assert ring_time(1e6, 1, "all_reduce", link, call_latency=0.003) == 0.0  # no peers, no call


# --- ZeRO buffers and the backend's collective temporaries ------------------------------------------------


def test_zero_buffers_are_sized_from_the_trainers_deepspeed_config():
    """The planner and the run read the same bucket and live-parameter limits."""
    from trainer.config.validate import batch_plan
    from trainer.runtime.ds_config import (
        ZERO3_MAX_LIVE_PARAMETERS,
        ZERO3_SUB_GROUP_ELEMENTS,
        ZERO_BUCKET_ELEMENTS,
        ds_config,
    )

    cfg, _ = compose_config(["parallel.zero_stage=3"])
    zero = ds_config(cfg, batch_plan(cfg, 1))["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == ZERO_BUCKET_ELEMENTS
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == ZERO3_MAX_LIVE_PARAMETERS
    assert zero["sub_group_size"] == ZERO3_SUB_GROUP_ELEMENTS


def test_zero_buffers_count_the_bucket_live_weights_step_and_backend_copies():
    from trainer.analysis.planner.memory import Collectives, buffer_bytes
    from trainer.runtime.ds_config import ZERO3_MAX_LIVE_PARAMETERS, ZERO3_SUB_GROUP_ELEMENTS, ZERO_BUCKET_ELEMENTS

    small, gloo = 1e6, Collectives(gather=4.0, scatter=2.5)
    step = 4 * small / 4  # AdamW's fp32 temporary over the rank's quarter of the parameters
    assert buffer_bytes(_layout(1, 1, 4, 0), small, "fp32", gloo) == 0  # ZeRO-0: gradients all-reduced in place
    # ZeRO-1/2: the touched part of the reduce bucket, the step, plus gloo's copies of the all-gathered weights
    assert buffer_bytes(_layout(1, 1, 4, 2), small, "fp32") == 4 * small + step
    assert buffer_bytes(_layout(1, 1, 4, 1), small, "fp32", gloo) == 4 * small + step + 4.0 * 4 * small
    # ZeRO-3: bucket + every weight live (under the limit) + the step + copies of one gather and one reduce-scatter
    z3 = buffer_bytes(_layout(1, 1, 4, 3), small, "fp32", gloo)
    assert z3 == pytest.approx(4 * small * (1 + 1 + 4.0 + 2.5) + step)
    # a large stage on NCCL: one bf16 bucket, the live-parameter cap and one fp32 sub-group stepped, no copies
    big = 20e9
    expected = 2 * (ZERO_BUCKET_ELEMENTS + ZERO3_MAX_LIVE_PARAMETERS) + 4 * ZERO3_SUB_GROUP_ELEMENTS
    assert buffer_bytes(_layout(1, 1, 64, 3), big, "bf16") == expected
    # a parameter larger than the buckets (an embedding) is gathered and its gradient reduced whole
    embedding = 5 * ZERO_BUCKET_ELEMENTS
    grown = buffer_bytes(_layout(1, 1, 64, 3), big, "bf16", largest=embedding)
    assert grown == expected + 2 * 2 * (embedding - ZERO_BUCKET_ELEMENTS)
    # ZeRO-1/2 reduce through buckets whatever the sizes
    assert buffer_bytes(_layout(1, 1, 4, 2), small, "fp32", largest=embedding) == 4 * small + step


def test_the_largest_tensor_is_the_embedding_where_a_stage_holds_it():
    from trainer.model.shape import ModelShape

    shape = ModelShape(n_layer=12, n_embd=768, n_head=12, seq_len=1024, vocab_size=50257, vocab_multiple=128)
    assert shape.largest_tensor(tp=1) == 50304 * 768
    assert shape.largest_tensor(tp=2) == 50432 * 768 / 2  # padded to a multiple of 2·128
    assert shape.largest_tensor(tp=2, embedding=False) == 4 * 768 * 768 / 2


def test_gloo_gathers_and_scatters_through_temporaries():
    """What the cpu-local cluster measures: gloo (unlike NCCL) copies a gathered / scattered buffer at least
    once more, so ZeRO on CPU needs that memory on top of its buckets."""
    from trainer.analysis.planner.localbench import gloo_overheads

    measured = gloo_overheads()
    assert measured is not None
    assert measured["gather"] >= 1.0 and measured["scatter"] >= 1.0, measured


# The machine the committed reports ran on, measured idle (docs/planner.md, Calibration).
THIS_MACHINE = ClusterConfig(
    **yaml.safe_load((ROOT / "conf/cluster/cpu-local.yaml").read_text())
    | dict(
        measure=False,
        gpus_per_node=2,
        cpu_cores=2,
        mem_per_gpu_gb=25.3,
        peak_tflops_fp32=0.135,
        peak_tflops_bf16=0.367,
        mem_bw_gbs=24.8,
        intra_node_bw_gbs=0.96,
        intra_node_latency_us=102,
        inter_node_bw_gbs=0.96,
        inter_node_latency_us=102,
        gather_overhead=4.1,
        scatter_overhead=2.4,
    )
)


@pytest.mark.parametrize("report", ["docs/compare", "docs/planner-check"])
def test_calibration_on_the_committed_world4_reports(report):
    """The issue's acceptance on this machine's measured runs: every layout's peak memory within 15 %, and
    the throughput ranking with Spearman rho >= 0.8 (the runs are recorded, so this is deterministic)."""
    shape = replace(TINY, seq_len=128)
    measured = read_results(str(ROOT / report), 16, "fp32")
    result = fit(shape, lambda world: spec_for_world(THIS_MACHINE, world), measured)
    errors = [(m.label, round(mem / (m.peak_mem_mb * 2**20) - 1, 3)) for m, _, mem in result.rows]
    assert len(errors) == 12 and max(abs(e) for _, e in errors) < 0.15, errors
    assert result.spearman >= 0.8


def test_cpu_ranks_at_zero3_count_no_allocator_slack():
    """The trainer makes a CPU rank's C heap lean at ZeRO-3 (train.host_heap=auto), so freed memory leaves
    the process and the planner adds no fragmentation there; other stages and GPUs keep the cluster's."""
    from trainer.config.schema import lean_heap

    assert lean_heap("auto", True, 3) and not lean_heap("auto", True, 2) and not lean_heap("auto", False, 3)
    assert lean_heap("lean", False, 0) and not lean_heap("glibc", True, 3)
    cpu = replace(SMALL_CPU, gpu="cpu", fragmentation=0.2)
    for gpu, zero, slack in [("cpu", 3, 0.0), ("cpu", 2, 0.2), ("A100", 3, 0.2)]:
        spec = cluster_spec(replace(cpu, gpu=gpu))
        memory = predict(TINY, _layout(1, 1, 4, zero, 2), 8, "fp32", spec).memory
        allocated = memory.total - memory.margin
        assert memory.margin == pytest.approx(spec.reserved_bytes + slack * allocated)


@pytest.mark.parametrize("partition", ["parameters", "uniform"])
def test_the_printed_command_keeps_the_partition_it_was_planned_for(partition):
    from io import StringIO

    from rich.console import Console

    from trainer.analysis.planner.report import print_command

    # pipeline_efficiency 1: DeepSpeed's slower pipeline engine would rank ZeRO-3 first under "uniform"
    cluster = cluster_spec(replace(compose_plan(["cluster=dgx-a100"]).cluster, nodes=16, pipeline_efficiency=1.0))
    shape = ModelShape.from_config(compose_config(["model=gpt3-175b"])[0].model)
    plan = make_plan(shape, cluster, 1536, "bf16", partition)
    assert plan.ranked[0].layout.pp > 1  # a pipeline is planned: its stages depend on the partition
    out = StringIO()
    print_command(Console(file=out, width=400), plan, ["model=gpt3-175b"])
    assert ("parallel.pipeline_partition=uniform" in out.getvalue()) == (partition == "uniform")
