"""The comparison report: ``results``' measured-beside-predicted numbers as report.md, results.csv (one
row per layout), ranks.csv (one row per rank) and PNG plots, into the comparison's folder."""

from __future__ import annotations

import csv
from pathlib import Path

from trainer.analysis.compare.results import STATE_KINDS, TIME_KINDS, LayoutResult, RankResult, summarise
from trainer.analysis.compare.sync import MB, sync_table

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
    "dp_sync", "sync_interval", "outer_optimizer", "sync_rank_bytes", "predicted_sync_rank_bytes",
    "sync_busiest_link_bytes", "predicted_sync_busiest_link_bytes",
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
    row.update(dp_sync=lay.dp_sync, sync_interval=lay.sync_interval, outer_optimizer=lay.outer_optimizer)
    if r.sync is not None:
        s = r.sync
        row.update(sync_rank_bytes=round(s.rank_bytes), predicted_sync_rank_bytes=round(s.predicted_rank_bytes))
        row["sync_busiest_link_bytes"] = round(s.busiest_link_bytes)
        row["predicted_sync_busiest_link_bytes"] = round(s.predicted_busiest_link_bytes)
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
        *sync_table(results),
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
