"""The comparison report: every measured number of ``trainer.compare``'s runs beside its prediction from
``trainer.analysis.formulas``, as report.md, results.csv (one row per layout and rank) and PNG plots.

What is compared, per rank (medians over the measured steps; memory at its high-water mark):

    state memory   params, grads, fp32 master copy, Adam states  vs  zero_state_bytes(Ψ_rank, dp, ZeRO, fp32)
                   with Ψ_rank = ModelShape.rank_params(...) for the rank's tp shard and pipeline stage, and the
                   master copy that DeepSpeed's ZeRO optimizers keep even in fp32
    activations    bytes saved for backward  vs  Korthikanti et al. per layer (no s×s scores: the fused
                   attention kernel keeps none) × layers on the rank + the output layer, × micro-batches in
                   flight on a pipeline stage
    communication  bytes this rank sends per step (ring)  vs  zero_collectives + tp_collectives + pipeline
                   sends + tied-embedding all-reduce; the paper's DP count (2Ψ, 3Ψ for ZeRO-3) beside it
    bubble         idle / compute per pipeline stage  vs  (p-1)/m
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from trainer.analysis.formulas import (
    activation_bytes_per_layer,
    dp_comm_bytes_per_step,
    head_activation_bytes,
    pipeline_bubble,
    pipeline_p2p_bytes,
    tp_collectives,
    wire_bytes,
    zero2_gradient_elements,
    zero_collectives,
    zero_state_bytes,
)

MB = 2**20
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
    pred = _predict(outcome, last["positions"], last["coords"]["pp"], last["coords"]["dp"])
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
        comm_wire=_median([e.get("ds_comm_wire_bytes", 0) + e.get("tp_comm_wire_bytes", 0) for e in entries]),
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
    """Parameter sizes of the dense GPT in the optimizer's two groups (trainer.runtime.engine.param_groups:
    matrices decayed, vectors not), in module order: the order ZeRO flattens them in."""
    import torch

    from trainer.model import GPT

    with torch.device("meta"):
        params = list(GPT(shape).parameters())
    return [[p.numel() for p in params if p.dim() >= 2], [p.numel() for p in params if p.dim() < 2]]


def _predict(outcome, positions: list[int], stage: int, coords_dp: int) -> dict:
    """Everything trainer.analysis.formulas predicts for one rank of a layout."""
    from trainer.parallel.apply import model_shape

    lay, cfg, plan = outcome.layout, outcome.cfg, outcome.plan
    shape = model_shape(cfg)
    l, h, a, s, V = shape.n_layer, shape.n_embd, shape.n_head, shape.seq_len, shape.vocab_size
    t, p, dp, b, m = lay.tp, lay.pp, lay.dp, plan.micro_batch, plan.grad_accum
    where = range(*positions)
    psi = shape.rank_params(t, where)
    state = zero_state_bytes(psi, dp, lay.zero, "fp32")
    grads = state.grads
    if lay.zero == 2 and t == p == 1:  # DeepSpeed keeps whole gradients of the parameters its slice touches
        grads = 4 * zero2_gradient_elements(_dense_param_groups(shape), dp, coords_dp)
    blocks = sum(1 for pos in where if 1 <= pos <= l)
    in_flight = min(p - stage, m) if p > 1 else 1
    per_micro = blocks * activation_bytes_per_layer(s, b, h, a, t, lay.sp, "fp32", scores=False)
    per_micro += head_activation_bytes(s, b, h, V, t) if l + 2 in where else 0.0
    dp_kinds = zero_collectives(psi, dp, lay.zero, m)
    tp = tp_collectives(l, b, s, h, t, lay.sp, positions=where)
    tp_total = (sum(c for c, _ in tp.values()) * m, sum(bytes_ for _, bytes_ in tp.values()) * m)
    comm = sum(wire_bytes(k, v, dp) for k, v in dp_kinds.items())
    comm += sum(wire_bytes(k, v * m, t) for k, (_, v) in tp.items())
    comm += pipeline_p2p_bytes(b, s // t if lay.sp else s, h, stage, p, m, t=t, partitioned=t > 1 and not lay.sp)
    if p > 1 and stage in (0, p - 1):  # the tied embedding's gradient, all-reduced between the end stages
        comm += wire_bytes("all_reduce", V * h / t * 4, 2)
    return {
        "psi": psi,
        "params": state.params,
        "grads": grads,
        "master": state.master,
        "optimizer": state.states,
        "activations": in_flight * per_micro,
        "comm_wire": comm,
        "paper_comm_wire": dp_comm_bytes_per_step(psi, dp, lay.zero),
        "tp": tp_total,
        "dp_kinds": dp_kinds,
    }


# --- writing ------------------------------------------------------------------------------------------


def write_report(outcomes, settings, seconds: float) -> str:
    """report.md, results.csv and the plots into ``settings.out``; returns the headline table."""
    results = [summarise(o, settings) for o in outcomes]
    out = settings.out
    table = headline_table(results)
    _write_csv(out, results, settings)
    plots = write_plots(results, out)
    (out / "report.md").write_text(markdown(results, settings, seconds, table, plots))
    return table


def _baseline_speed(results: list[LayoutResult]) -> float | None:
    return next((r.tokens_per_s for r in results if r.name == "baseline" and r.tokens_per_s), None)


def headline_table(results: list[LayoutResult]) -> str:
    base = _baseline_speed(results)
    rows = [
        "| layout | degrees | tokens/s | × baseline | step s | state MB rank 0 (meas / pred) | max state dev "
        "| activations MB rank 0 (meas / pred) | comm MB/step rank 0 (meas / pred / paper DP) | bubble per stage "
        "(meas / (p-1)/m) | peak RSS MB | final loss |",
        "|" + "---|" * 12,
    ]
    for r in results:
        if r.status != "ok":
            rows.append(f"| {r.name} | {r.status}: {r.reason} |" + " |" * 10)
            continue
        r0 = r.ranks[0]
        state_m = sum(r0.mem.get(k, 0) for k in STATE_KINDS) / MB
        state_p = sum(r0.predicted[k] for k in STATE_KINDS) / MB
        dev = max(x.state_deviation() for x in r.ranks)
        ratio = f"{r.tokens_per_s / base:.2f}" if base else "n/a"
        bubble = "–"
        if r.predicted_bubble is not None:
            stages = ", ".join(f"{x.bubble:.2f}" for x in r.ranks if x.dp == 0 and x.tp == 0)
            bubble = f"{stages} / {r.predicted_bubble:.2f}"
        rows.append(
            f"| {r.name} | {r.degrees} | {r.tokens_per_s:,.0f} | {ratio} | {r.step_time_s:.3f} | "
            f"{state_m:.1f} / {state_p:.1f} | {dev:.2%} | {r0.mem.get('activations', 0) / MB:.1f} / "
            f"{r0.predicted['activations'] / MB:.1f} | {r0.comm_wire / MB:.2f} / {r0.predicted_comm_wire / MB:.2f} / "
            f"{r0.paper_comm_wire / MB:.2f} | {bubble} | {max(x.peak_rss for x in r.ranks) / MB:,.0f} | "
            f"{r.final_loss:.4f} |"
        )
    return "\n".join(rows)


# results.csv: one row per layout, with the degrees trainer.analysis.planner's calibration reads (tp, pp, dp,
# zero_stage, sequence_parallel, micro_batch, global_batch, precision, tokens_per_s, peak_mem_mb).
RESULT_FIELDS = [
    "layout", "status", "reason", "ranks", "tp", "pp", "dp", "zero_stage", "sequence_parallel", "micro_batch",
    "global_batch", "precision", "tokens_per_s", "step_time_s", "peak_mem_mb", "max_state_deviation",
    "bubble_per_stage", "predicted_bubble", "final_loss", "val_loss", "run_dir", "wandb_id",
]  # fmt: skip
# ranks.csv: one row per rank of every layout that ran, measured beside predicted. Coordinates are
# the rank's place in the mesh (tp_rank, pp_rank = pipeline stage, dp_rank).
RANK_FIELDS = [
    "layout", "rank", "tp_rank", "pp_rank", "dp_rank", "shard_params", "predicted_params",
    *[f"{k}_bytes" for k in (*STATE_KINDS, "activations", "buffers", "other")],
    *[f"predicted_{k}_bytes" for k in (*STATE_KINDS, "activations")], "peak_rss_bytes", "cpu_percent",
    *TIME_KINDS, "comm_wire_bytes", "predicted_comm_wire_bytes", "paper_comm_wire_bytes", "tp_count",
    "tp_bytes", "predicted_tp_count", "predicted_tp_bytes", "bubble",
]  # fmt: skip


def _write_csv(out: Path, results: list[LayoutResult], settings) -> None:
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(_layout_fields(r, settings))
    with (out / "ranks.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RANK_FIELDS)
        writer.writeheader()
        for r in results:
            for x in r.ranks:
                writer.writerow(_rank_fields(x))


def _layout_fields(r: LayoutResult, settings) -> dict:
    lay = r.layout
    row = {"layout": r.name, "status": r.status, "reason": r.reason, "ranks": lay.ranks, "tp": lay.tp}
    row.update(pp=lay.pp, dp=lay.dp, zero_stage=lay.zero, sequence_parallel=lay.sp, precision="fp32")
    row.update(micro_batch=settings.micro_batch, global_batch=settings.global_batch)
    row.update(run_dir=r.run_dir, wandb_id=r.wandb_id, predicted_bubble=r.predicted_bubble)
    if r.status == "ok":
        row.update(tokens_per_s=round(r.tokens_per_s, 1), step_time_s=round(r.step_time_s, 5))
        row["peak_mem_mb"] = round(max(x.peak_rss for x in r.ranks) / MB, 1)  # MiB, as in metrics.jsonl
        row["max_state_deviation"] = round(max(x.state_deviation() for x in r.ranks), 5)
        stages = [x.bubble for x in r.ranks if x.bubble is not None and x.dp == x.tp == 0]
        row["bubble_per_stage"] = " ".join(f"{b:.4f}" for b in stages)
        row.update(final_loss=r.final_loss, val_loss=r.val_loss)
    return row


def _rank_fields(x: RankResult) -> dict:
    row = {"layout": x.layout, "rank": x.rank, "tp_rank": x.tp, "pp_rank": x.pp, "dp_rank": x.dp}
    row["shard_params"] = x.shard_params
    row["predicted_params"] = x.predicted_params
    row.update({f"{k}_bytes": x.mem.get(k, 0) for k in (*STATE_KINDS, "activations", "buffers", "other")})
    row.update({f"predicted_{k}_bytes": round(v) for k, v in x.predicted.items()})
    row.update(peak_rss_bytes=x.peak_rss, cpu_percent=x.cpu_percent, **{k: round(v, 5) for k, v in x.time.items()})
    row.update(comm_wire_bytes=round(x.comm_wire), predicted_comm_wire_bytes=round(x.predicted_comm_wire))
    row.update(paper_comm_wire_bytes=round(x.paper_comm_wire), tp_count=x.tp_count, tp_bytes=x.tp_bytes)
    row.update(predicted_tp_count=x.predicted_tp[0], predicted_tp_bytes=x.predicted_tp[1], bubble=x.bubble)
    return row


# --- plots ------------------------------------------------------------------------------------------------


def write_plots(results: list[LayoutResult], out: Path) -> list[str]:
    """throughput, memory by kind per rank, communication, time breakdown and loss curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return []
    names = []
    for name, draw in (
        ("throughput", _plot_throughput),
        ("memory", _plot_memory),
        ("communication", _plot_comm),
        ("time", _plot_time),
        ("loss", _plot_loss),
    ):
        fig, ax = plt.subplots(figsize=(11, 5))
        draw(ax, ok)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        names.append(f"{name}.png")
    return names


def _plot_throughput(ax, ok: list[LayoutResult]) -> None:
    ax.bar([r.name for r in ok], [r.tokens_per_s for r in ok], color="tab:blue")
    base = _baseline_speed(ok)
    if base:
        ax.axhline(base, color="black", linestyle="--", label="baseline (plain PyTorch, 1 process)")
        ax.legend()
    ax.set_ylabel("tokens / s (median of measured steps)")
    ax.set_title("Throughput")
    ax.tick_params(axis="x", rotation=30)


def _rank_labels(ok: list[LayoutResult]) -> list[tuple[str, RankResult]]:
    return [(f"{r.name}\nr{x.rank}", x) for r in ok for x in r.ranks]


def _plot_memory(ax, ok: list[LayoutResult]) -> None:
    bars = _rank_labels(ok)
    labels = [label for label, _ in bars]
    bottom = [0.0] * len(bars)
    for kind in (*STATE_KINDS, "activations"):
        values = [x.mem.get(kind, 0) / MB for _, x in bars]
        ax.bar(labels, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    predicted = [sum(x.predicted[k] for k in (*STATE_KINDS, "activations")) / MB for _, x in bars]
    ax.scatter(labels, predicted, color="black", marker="_", s=300, zorder=3, label="predicted (analytic)")
    ax.set_ylabel("MB per rank (tracked tensors)")
    ax.set_title("Memory per rank by kind (ZeRO's communication buckets are in the tables, not drawn)")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.legend(fontsize=8)


def _plot_comm(ax, ok: list[LayoutResult]) -> None:
    bars = _rank_labels(ok)
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [x.comm_wire / MB for _, x in bars], width=0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [x.predicted_comm_wire / MB for _, x in bars], width=0.4, label="predicted")
    ax.set_xticks(list(xs), [label for label, _ in bars], rotation=90, fontsize=7)
    ax.set_ylabel("MB sent per step per rank")
    ax.set_title("Communication volume (DeepSpeed's collectives + tensor-parallel layers)")
    ax.legend()


def _plot_time(ax, ok: list[LayoutResult]) -> None:
    labels = [r.name for r in ok]
    bottom = [0.0] * len(ok)
    for kind in TIME_KINDS:
        values = [r.ranks[0].time[kind] for r in ok]
        ax.bar(labels, values, bottom=bottom, label=kind.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per step (rank 0, median)")
    ax.set_title("Step time breakdown (compute phases exclude the communication inside them)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)


def _plot_loss(ax, ok: list[LayoutResult]) -> None:
    for r in ok:
        ax.plot([s for s, _ in r.losses], [v for _, v in r.losses], label=r.name, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves (same data, same initial weights)")
    ax.legend(fontsize=8, ncol=2)


# --- report.md --------------------------------------------------------------------------------------------


def markdown(results: list[LayoutResult], settings, seconds: float, table: str, plots: list[str]) -> str:
    lines = [
        "# Parallel layouts compared",
        "",
        _setup_text(results, settings, seconds),
        "",
        table,
        "",
        *_baseline_text(results),
        *[f"![{p.removesuffix('.png')}]({p})" for p in plots],
        "",
        "## Per layout",
        "",
    ]
    for r in results:
        lines += _layout_section(r)
    lines += ["## How it is measured", "", METHODS]
    return "\n".join(lines) + "\n"


def _setup_text(results: list[LayoutResult], settings, seconds: float) -> str:
    from trainer.runtime.hardware import machine_description

    ok = [r for r in results if r.status == "ok"]
    return (
        f"Machine: {machine_description()}. World {settings.world}; overrides "
        f"`{' '.join(settings.passthrough)}`; micro-batch {settings.micro_batch}, global batch "
        f"{settings.global_batch}; {settings.warmup_steps} warm-up + {settings.steps} measured steps per layout "
        f"(every measured step instrumented). {len(ok)} of {len(results)} layouts ran; the comparison took "
        f"{seconds / 60:.1f} min. wandb group `{settings.group}`. Memory in MB = 2^20 bytes; communication is "
        "what one rank sends per optimizer step on a ring (all-reduce 2(n-1)/n, gather/scatter (n-1)/n of the "
        "buffer, a pipeline send once)."
    )


def _baseline_text(results: list[LayoutResult]) -> list[str]:
    by_name = {r.name: r for r in results if r.status == "ok"}
    if "baseline" not in by_name or "single" not in by_name:
        return []
    ratio = by_name["single"].tokens_per_s / by_name["baseline"].tokens_per_s
    return [
        f"The trainer on one rank (`single`) runs at {ratio:.2f}× the plain-PyTorch baseline in this comparison "
        "(instrumented steps; `benchmarks/baseline_ratio.py` measures the ratio on uninstrumented steps, median of "
        "several runs).",
        "",
    ]


def _layout_section(r: LayoutResult) -> list[str]:
    head = [f"### {r.name} ({r.degrees})", ""]
    if r.status != "ok":
        return head + [f"**{r.status}**: {r.reason}", ""]
    head.append(f"Run `{r.run_dir}`{f', wandb run `{r.wandb_id}`' if r.wandb_id else ''}; {r.seconds:.0f} s.")
    rows = [
        "",
        "| rank | coords tp/pp/dp | Ψ rank meas / pred | "
        + " | ".join(f"{k} MB meas / pred" for k in STATE_KINDS)
        + " | activations MB meas / pred | buffers MB | comm MB/step meas / pred | TP collectives count, MB "
        "meas / pred | DP collectives MB meas / pred | bubble | CPU % | peak RSS MB |",
        "|" + "---|" * 13,
    ]
    for x in r.ranks:
        states = " | ".join(f"{x.mem.get(k, 0) / MB:.2f} / {x.predicted[k] / MB:.2f}" for k in STATE_KINDS)
        dp_meas = " + ".join(f"{k} {v / MB:.2f}" for k, v in x.dp_kinds.items() if v > 1024) or "0"
        dp_pred = " + ".join(f"{k} {v / MB:.2f}" for k, v in x.predicted_dp_kinds.items()) or "0"
        rows.append(
            f"| {x.rank} | {x.tp}/{x.pp}/{x.dp} | {x.shard_params:,} / {x.predicted_params:,.0f} | {states} | "
            f"{x.mem.get('activations', 0) / MB:.2f} / {x.predicted['activations'] / MB:.2f} | "
            f"{x.mem.get('buffers', 0) / MB:.0f} | {x.comm_wire / MB:.3f} / {x.predicted_comm_wire / MB:.3f} | "
            f"{x.tp_count}, {x.tp_bytes / MB:.3f} / {x.predicted_tp[0]}, {x.predicted_tp[1] / MB:.3f} | "
            f"{dp_meas} / {dp_pred} | {'–' if x.bubble is None else f'{x.bubble:.3f}'} | {x.cpu_percent:.0f} | "
            f"{x.peak_rss / MB:,.0f} |"
        )
    times = ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.1f}" for k, v in r.ranks[0].time.items())
    tail = ["", f"Rank 0 step time (ms): {times}. Final loss {r.final_loss:.4f}, validation loss {r.val_loss:.4f}."]
    if r.predicted_bubble is not None:
        tail.append(f"Pipeline bubble (idle / compute per stage) predicted (p-1)/m = {r.predicted_bubble:.3f}.")
    return head + rows + tail + [""]


METHODS = """\
- **Throughput**: tokens of the global batch / wall time of the optimizer step, median over the measured
  steps (the loss all-reduce included). Achieved FLOP/s and MFU are in each run's metrics.jsonl.
- **Memory by kind**: the tensors the engine holds, each storage counted once
  (trainer.training.instruments.TensorCensus): parameters (a ZeRO-3 rank's partition), gradients (`.grad`
  and ZeRO's gradient partitions), the fp32 master copy (ZeRO-1/2 keep one even when the model is fp32, so
  their optimizer term is 12Ψ/Nd; ZeRO-3 steps its fp32 partition in place), Adam's
  moments, and ZeRO's reduce buckets ("buffers", not in the paper's count). Each kind at its high-water mark
  within a step: gradients after backward, optimizer states after the step. ZeRO-1's full gradients exist
  between micro-batches of one step, so the global batch gives every data-parallel rank at least 2.
- **Activations**: bytes autograd saves for backward (saved-tensor hooks; parameters excluded), peak over the
  step; under a pipeline the micro-batches in flight are all counted, as the prediction does (min(p - stage, m)).
- **Peak RSS**: the process's resident-set high-water mark on CPU (CUDA allocator peak on GPU), which includes
  Python, torch and DeepSpeed themselves.
- **Communication**: DeepSpeed's collectives from its communication logger (deepspeed.comm, on for measured
  steps; each op keyed by its group size), the tensor-parallel layers' from their CommStats counters. Bytes
  are what a rank sends on a ring. The loop's own loss reduction is not counted.
- **Time breakdown**: data, forward, backward and optimizer phases timed on every micro-batch (under a
  pipeline: DeepSpeed's ForwardPass/BackwardPass/OptimizerStep/LoadMicroBatch instructions); communication
  is the time inside collectives, including waiting for peers, and under a pipeline the sends and receives,
  where the bubble shows up; "other" is the rest of the step.
- **Bubble**: per stage, idle / compute, idle being the step's time outside forward, backward and the
  optimizer step (trainer.parallel.bubble), beside (p-1)/m (Narayanan et al. 2021).
- **CPU %**: process CPU time over the step's wall time (100 = one core busy). Ranks of one world share the
  machine's cores, so on a small CPU the layouts compete for the same cores and timings say more about
  overheads than about scaling.
"""
