"""Each compared run read back and set beside its prediction from ``trainer.analysis.formulas`` (one
``RankResult`` per rank, one ``LayoutResult`` per layout); ``trainer.analysis.compare.report`` writes them.

What is compared, per rank (medians over the measured steps; memory at its high-water mark):

    state memory   params, grads, fp32 master copy, Adam states  vs  zero_state_bytes(Ψ_rank, dp, ZeRO, fp32)
                   with Ψ_rank = ModelShape.rank_params(...) for the rank's tp shard and pipeline stage, and the
                   master copy that DeepSpeed's ZeRO optimizers keep even in fp32
    activations    bytes saved for backward  vs  Korthikanti et al. per layer for the model's architecture
                   (shape_activation_bytes; no s×s scores: the fused attention kernel keeps none; a recomputed
                   run only its input) × layers on the rank + the output layer, × micro-batches in flight on
                   a pipeline stage
    communication  bytes this rank sends per step (ring)  vs  zero_collectives + tp_collectives (with what
                   full recompute repeats) + pipeline
                   sends + the tied embedding's all-reduce (none for an untied head); the paper's DP count
                   (2Ψ, 3Ψ for ZeRO-3) beside it
    bubble         idle / compute per pipeline stage  vs  (p-1)/m
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from functools import partial

from trainer.analysis.compare.sync import SyncResult, rank_sync_bytes, scheme_label, sync_result
from trainer.analysis.formulas import (
    dp_comm_bytes_per_step,
    head_activation_bytes,
    pipeline_bubble,
    pipeline_p2p_bytes,
    recompute_stops_early,
    recomputed_runs,
    shape_activation_bytes,
    tp_collectives,
    wire_bytes,
    zero2_gradient_elements,
    zero_collectives,
    zero_state_bytes,
)
from trainer.training.record import COMM_FAMILIES

STATE_KINDS = ("params", "grads", "master", "optimizer")
TIME_KINDS = ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_s", "other_s")


@dataclass
class RankResult:
    """One rank of one layout: measured beside predicted."""

    layout: str
    rank: int
    tp: int
    pp: int
    dp: int
    shard_params: int
    predicted_params: float
    mem: dict[str, int]  # measured bytes by kind (trainer.training.instruments.KINDS + activations)
    predicted: dict[str, float]  # params, grads, master, optimizer, activations
    peak_rss: int
    cpu_percent: float
    time: dict[str, float]
    comm_wire: float  # bytes sent per step, DeepSpeed's collectives + tensor-parallel ones
    predicted_comm_wire: float
    paper_comm_wire: float
    tp_count: int
    tp_bytes: float
    predicted_tp: tuple[int, float]
    dp_kinds: dict[str, float]  # DeepSpeed full-buffer bytes per kind over the dp group
    predicted_dp_kinds: dict[str, float]
    bubble: float | None = None  # idle / compute of this pipeline stage

    def state_deviation(self) -> float:
        """Largest |measured / predicted - 1| over params, grads, master and optimizer states."""
        return max(_dev(self.mem[k], self.predicted[k]) for k in STATE_KINDS)


@dataclass
class LayoutResult:
    layout: object  # trainer.compare.CompareLayout
    name: str
    status: str
    reason: str
    degrees: str
    run_dir: str
    wandb_id: str
    seconds: float
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    final_loss: float | None = None
    val_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    ranks: list[RankResult] = field(default_factory=list)
    micro_batches: int = 0
    predicted_bubble: float | None = None
    sync: SyncResult | None = None  # layouts with whole replicas: parallel.dp_sync's traffic (compare.sync)


def _dev(measured: float, predicted: float) -> float:
    if predicted == 0:
        return 0.0 if measured == 0 else float("inf")
    return abs(measured / predicted - 1)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# --- reading runs ---------------------------------------------------------------------------------


def summarise(outcome, settings) -> LayoutResult:
    lay = outcome.layout
    degrees = "1 process" if lay.ranks == 1 else f"tp{lay.tp}·pp{lay.pp}·dp{lay.dp}, ZeRO-{lay.zero}"
    degrees += ", SP" if lay.sp else ""
    degrees += f", {lay.recompute} recompute" if lay.recompute != "none" else ""
    degrees += f", {scheme_label(lay)}" if lay.dp_sync != "allreduce" else ""
    result = LayoutResult(
        lay,
        lay.name,
        outcome.status,
        outcome.reason,
        degrees,
        outcome.run_dir.relative_to(settings.out).as_posix()
        if outcome.run_dir
        else "",  # as the report's folder sees it
        outcome.wandb_id,
        outcome.seconds,
    )
    if outcome.status != "ok":
        return result
    records = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    measured = steps[settings.warmup_steps :] or steps[-1:]
    result.losses = [(r["step"], r["loss"]) for r in steps]
    result.final_loss = steps[-1]["loss"]
    result.val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    result.tokens_per_s = _median([r["tokens_per_s"] for r in measured])
    result.step_time_s = _median([r["step_time_s"] for r in measured])
    result.micro_batches = outcome.plan.grad_accum
    if lay.pp > 1:
        result.predicted_bubble = pipeline_bubble(lay.pp, outcome.plan.grad_accum)
    result.ranks = [_rank_result(outcome, measured, i) for i in range(len(measured[0]["ranks"]))]
    result.sync = sync_result(lay, measured, outcome.cfg.train.steps, result.ranks[0].predicted_params)
    return result


def _rank_result(outcome, measured: list[dict], i: int) -> RankResult:
    entries = [r["ranks"][i] for r in measured]
    last = entries[-1]
    mem = {k: max(e["mem"].get(k, 0) for e in entries) for k in entries[0]["mem"]}
    tp_kinds = last.get("tp_comm", {})
    ds_per_step = [e.get("ds_comm", {}) for e in entries]
    dp_size = outcome.layout.dp
    dp_kinds: dict[str, float] = {}
    for kind in ("all_reduce", "all_gather", "reduce_scatter") if dp_size > 1 else ():
        dp_kinds[kind] = _median([step.get(f"{kind}@{dp_size}", {}).get("bytes", 0) for step in ds_per_step])
    pred = predict_rank(outcome, last["positions"], last["coords"]["pp"], last["coords"]["dp"])
    if outcome.layout.dp_sync != "allreduce":  # the scheme's own messages, in place of DeepSpeed's all-reduce
        steps, dp_rank = outcome.cfg.train.steps, last["coords"]["dp"]
        pred["comm_wire"] += rank_sync_bytes(outcome.layout, measured, steps, pred["psi"], dp_rank)
    bubble = None
    if outcome.layout.pp > 1:
        bubble = _median([r["pipe_bubble_ratio"][last["coords"]["pp"]] for r in measured])
    return RankResult(
        layout=outcome.layout.name,
        rank=last["rank"],
        **last["coords"],
        shard_params=last["shard_params"],
        predicted_params=pred["psi"],
        mem=mem,
        predicted={k: pred[k] for k in (*STATE_KINDS, "activations")},
        peak_rss=max(e["peak_mem_bytes"] for e in entries),
        cpu_percent=_median([e["cpu_percent"] for e in entries]),
        time={k: _median([e["time"].get(k, 0.0) for e in entries]) for k in TIME_KINDS},
        # a mean: local SGD's steps differ (it syncs on some), every other layout's are alike
        comm_wire=statistics.mean(sum(e.get(f"{f}_wire_bytes", 0) for f in COMM_FAMILIES) for e in entries),
        predicted_comm_wire=pred["comm_wire"],
        paper_comm_wire=pred["paper_comm_wire"],
        tp_count=sum(v["count"] for v in tp_kinds.values()),
        tp_bytes=sum(v["bytes"] for v in tp_kinds.values()),
        predicted_tp=pred["tp"],
        dp_kinds={k: v for k, v in dp_kinds.items() if v or pred["dp_kinds"].get(k)},
        predicted_dp_kinds=pred["dp_kinds"],
        bubble=bubble,
    )


# --- predictions ------------------------------------------------------------------------------------


def _dense_param_groups(shape) -> list[list[int]]:
    """Parameter sizes of the dense model in the optimizer's two groups (trainer.runtime.engine.param_groups:
    matrices decayed, vectors not), in module order: the order ZeRO flattens them in."""
    import torch

    from trainer.model import GPT

    with torch.device("meta"):
        params = list(GPT(shape).parameters())
    return [[p.numel() for p in params if p.dim() >= 2], [p.numel() for p in params if p.dim() < 2]]


def _predicted_activations(shape, cfg, where: range, stage: int, m: int, b: int, t: int, sp: bool, p: int):
    """(the high-water mark of activations ``ActivationMeter`` sees on a rank, full recompute's runs there).

    Per micro-batch in flight: a fully recomputed run keeps its first block's input, a block in none what it
    keeps without (the fused attention: no s×s scores), the last stage the head's. A pipeline stage recomputes
    a run in backward with DeepSpeed's reentrant checkpoint, under the meter's hooks: its largest run's whole
    activations add once, after the head's backward has freed the head's (the peak is the larger of the two
    moments). torch's non-reentrant checkpoint (pp 1) holds the recomputed tensors out of their sight."""
    from trainer.config.validate import recompute_plan

    l, s, h, V = shape.n_layer, shape.seq_len, shape.n_embd, shape.vocab_size
    blocks = sum(1 for pos in where if 1 <= pos <= l)
    recompute, every = recompute_plan(cfg.parallel)
    runs = recomputed_runs(where, l, every, pipelined=p > 1) if recompute == "full" else []
    kept = partial(shape_activation_bytes, shape, b, t, sp, "fp32", False)
    per_micro = len(runs) * kept("full") + (blocks - sum(runs)) * kept("none" if recompute == "full" else recompute)
    head = head_activation_bytes(s, b, h, V, t, fused=cfg.speed.fused_loss) if l + 2 in where else 0.0
    forward = min(p - stage, m) * (per_micro + head) if p > 1 else per_micro + head
    if not (runs and p > 1):
        return forward, runs
    return max(forward, forward - head + max(runs) * kept("none")), runs


def predict_rank(outcome, positions: list[int], stage: int, coords_dp: int) -> dict:
    """Everything trainer.analysis.formulas predicts for one rank of a layout."""
    from trainer.parallel.apply import model_shape

    lay, cfg, plan = outcome.layout, outcome.cfg, outcome.plan
    shape = model_shape(cfg)
    l, h, s, V = shape.n_layer, shape.n_embd, shape.seq_len, shape.vocab_size
    t, p, dp, b, m = lay.tp, lay.pp, lay.dp, plan.micro_batch, plan.grad_accum
    where = range(*positions)
    psi = shape.rank_params(t, where)
    state = zero_state_bytes(psi, dp, lay.zero, "fp32")
    grads = state.grads
    if lay.zero == 2 and t == p == 1:  # DeepSpeed keeps whole gradients of the parameters its slice touches
        grads = 4 * zero2_gradient_elements(_dense_param_groups(shape), dp, coords_dp)
    activations, runs = _predicted_activations(shape, cfg, where, stage, m, b, t, lay.sp, p)
    dp_kinds = zero_collectives(psi, dp, lay.zero, m) if lay.dp_sync == "allreduce" else {}
    tp = tp_collectives(l, b, s, h, t, lay.sp, 4, where, shape.replicated_vectors(), runs, recompute_stops_early(p > 1))
    tp_total = (sum(c for c, _ in tp.values()) * m, sum(bytes_ for _, bytes_ in tp.values()) * m)
    comm = sum(wire_bytes(k, v, dp) for k, v in dp_kinds.items())
    comm += sum(wire_bytes(k, v * m, t) for k, (_, v) in tp.items())
    comm += pipeline_p2p_bytes(b, s // t if lay.sp else s, h, stage, p, m, t=t, partitioned=t > 1 and not lay.sp)
    if shape.tie_embeddings and p > 1 and stage in (0, p - 1):  # the tied embedding's gradient, end stages
        comm += wire_bytes("all_reduce", V * h / t * 4, 2)
    return {
        "psi": psi,
        "params": state.params,
        "grads": grads,
        "master": state.master,
        "optimizer": state.states,
        "activations": activations,
        "comm_wire": comm,
        "paper_comm_wire": dp_comm_bytes_per_step(psi, dp, lay.zero),
        "tp": tp_total,
        "dp_kinds": dp_kinds,
    }
