"""Fit the efficiency factors to measured runs and say how well the planner predicts them.

Reads a ``trainer.compare`` report's ``results.csv`` (one row per layout). Required columns: tp, pp, dp,
zero_stage, sequence_parallel, tokens_per_s, peak_mem_mb. Optional: micro_batch, global_batch, precision,
recompute and activation_checkpoint_interval (read as the trainer reads them, ``recompute_plan``); missing
ones take the trainer's defaults (trainer.config.schema.ParallelConfig) or the plan's global batch and
precision. Rows without a tokens_per_s (failed runs) are skipped.

Fitted: the matmul efficiency and a scale on the link bandwidths (least squares on log tokens/s, grid
search), and the runtime memory per rank (median of measured minus predicted; on CPU the peak RSS
includes Python, torch and DeepSpeed). Reported: memory error per layout and the Spearman rank
correlation between predicted and measured throughput.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from trainer.analysis.planner.cluster import ClusterSpec
from trainer.analysis.planner.layouts import Layout
from trainer.analysis.planner.predict import Prediction, predict
from trainer.config.schema import BadInput, ParallelConfig
from trainer.config.validate import recompute_plan
from trainer.model.shape import ModelShape

REQUIRED = ("tp", "pp", "dp", "zero_stage", "sequence_parallel", "tokens_per_s", "peak_mem_mb")
MB = 2**20  # results.csv and metrics.jsonl give peak_mem_mb in MiB
EFFICIENCY_RANGE, COMM_RANGE = (0.005, 1.0), (0.05, 20.0)  # searched on a log grid
CALL_LATENCY_RANGE = (1e-6, 0.1)  # seconds per collective call; searched on a log grid with 0 in front


@dataclass(frozen=True)
class Measured:
    layout: Layout
    global_batch: int
    precision: str
    tokens_per_s: float
    peak_mem_mb: float

    @property
    def label(self) -> str:
        lay = self.layout
        sp = " sp" if lay.sequence_parallel else ""
        rc = f" {lay.recompute}" if lay.recompute != "none" else ""
        return f"tp{lay.tp} pp{lay.pp} dp{lay.dp} z{lay.zero_stage} mb{lay.micro_batch}{sp}{rc}"


@dataclass(frozen=True)
class Fit:
    compute_efficiency: float
    comm_scale: float
    call_latency: float  # seconds per collective call
    runtime_bytes: float  # fitted memory per rank outside the model
    rows: list[tuple[Measured, Prediction, float]]  # measured, prediction, predicted memory (fitted)
    spearman: float | None
    mean_abs_mem_error: float


def _flag(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes"):
        return True
    if text.strip().lower() in ("0", "false", "no", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def read_results(report_dir: str, global_batch: int, precision: str) -> list[Measured]:
    path = Path(report_dir) / "results.csv"
    if not path.is_file():
        raise BadInput(
            f"config error: plan.calibrate={report_dir!r}: no results.csv there; "
            "point it at a python -m trainer.compare report directory"
        )
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(
                f"config error: plan.calibrate: {path} lacks column(s) {', '.join(missing)}; "
                f"needed: {', '.join(REQUIRED)}"
            )
        rows = list(reader)
    measured = []
    for line, row in enumerate(rows, start=2):
        try:
            if row["tokens_per_s"].strip() not in ("", "nan"):
                measured.append(_measured(row, global_batch, precision))
        except (ValueError, KeyError) as err:
            raise BadInput(f"config error: plan.calibrate: {path} line {line}: {err}") from None
    if not measured:
        raise BadInput(f"config error: plan.calibrate: {path} has no row with a measured tokens_per_s")
    return measured


def _measured(row: dict[str, str], global_batch: int, precision: str) -> Measured:
    defaults = ParallelConfig()
    get = lambda key, default: row[key] if row.get(key, "").strip() else default  # noqa: E731
    recompute, _ = recompute_plan(
        ParallelConfig(
            recompute=get("recompute", "none"),
            activation_checkpoint_interval=int(get("activation_checkpoint_interval", "0")),
        )
    )
    layout = Layout(
        tp=int(row["tp"]),
        pp=int(row["pp"]),
        dp=int(row["dp"]),
        zero_stage=int(row["zero_stage"]),
        micro_batch=int(get("micro_batch", defaults.micro_batch)),
        recompute=recompute,
        sequence_parallel=_flag(row["sequence_parallel"]),
    )
    return Measured(
        layout,
        int(get("global_batch", global_batch)),
        get("precision", precision),
        float(row["tokens_per_s"]),
        float(row["peak_mem_mb"]),
    )


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (average ranks for ties); None with fewer than 2 distinct values on a side."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _geomspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def fit(shape: ModelShape, spec_for, measured: list[Measured]) -> Fit:
    """``spec_for(world)`` gives the cluster cut to a run's size. Grid search, then the memory offset."""
    specs: dict[int, ClusterSpec] = {}
    for m in measured:
        world = m.layout.tp * m.layout.pp * m.layout.dp
        specs.setdefault(world, spec_for(world))

    def predictions(eff: float, comm: float, call: float) -> list[Prediction]:
        out = []
        for m in measured:
            spec = specs[m.layout.tp * m.layout.pp * m.layout.dp].with_efficiency(eff, comm, call)
            out.append(predict(shape, m.layout, m.global_batch, m.precision, spec))
        return out

    def loss(preds: list[Prediction]) -> float:
        return sum((math.log(p.tokens_per_s) - math.log(m.tokens_per_s)) ** 2 for p, m in zip(preds, measured))

    # Coordinate descent: (efficiency, bandwidth) on a grid at a fixed per-call latency, then the latency
    # at fixed (efficiency, bandwidth); two rounds. The latency starts (and, on ties, stays) at 0.
    grid = [(e, c) for e in _geomspace(*EFFICIENCY_RANGE, 48) for c in _geomspace(*COMM_RANGE, 24)]
    calls = [0.0, *_geomspace(*CALL_LATENCY_RANGE, 21)]
    call = 0.0
    for _ in range(2):
        eff, comm = min(grid, key=lambda ec: loss(predictions(*ec, call)))
        call = min(calls, key=lambda c: loss(predictions(eff, comm, c)))
    eff, comm = min(grid, key=lambda ec: loss(predictions(*ec, call)))
    preds = predictions(eff, comm, call)
    reserved = next(iter(specs.values())).reserved_bytes
    model_bytes = [p.memory.total - reserved for p in preds]
    runtime = median(m.peak_mem_mb * MB - b for m, b in zip(measured, model_bytes))
    mem = [b + runtime for b in model_bytes]
    errors = [abs(pm / (m.peak_mem_mb * MB) - 1) for pm, m in zip(mem, measured)]
    rho = spearman([p.tokens_per_s for p in preds], [m.tokens_per_s for m in measured])
    return Fit(eff, comm, call, runtime, list(zip(measured, preds, mem)), rho, sum(errors) / len(errors))


def print_fit(result: Fit, out) -> None:
    from rich.table import Table

    table = Table(title="predicted (fitted) vs measured", title_justify="left")
    for name in ("layout", "tokens/s measured", "predicted", "error", "peak MB measured", "predicted", "error"):
        table.add_column(name, justify="left" if name == "layout" else "right")
    for m, p, mem in result.rows:
        table.add_row(
            m.label,
            f"{m.tokens_per_s:,.0f}",
            f"{p.tokens_per_s:,.0f}",
            f"{p.tokens_per_s / m.tokens_per_s - 1:+.1%}",
            f"{m.peak_mem_mb:,.0f}",
            f"{mem / MB:,.0f}",
            f"{mem / (m.peak_mem_mb * MB) - 1:+.1%}",
        )
    out.print(table)
    rho = "n/a (fewer than 2 distinct values)" if result.spearman is None else f"{result.spearman:.3f}"
    out.print(f"throughput ranking: Spearman rho = {rho} over {len(result.rows)} layouts")
    out.print(
        f"memory: mean |error| {result.mean_abs_mem_error:.1%} after fitting the runtime memory per rank "
        f"({result.runtime_bytes / MB:,.0f} MB)"
    )
    out.print(
        f"fitted: cluster.compute_efficiency={result.compute_efficiency:.3g}, link bandwidth x "
        f"{result.comm_scale:.3g}, cluster.call_latency_us={result.call_latency * 1e6:.3g}, "
        f"cluster.reserved_gb={max(result.runtime_bytes, 0) / 1e9:.3g}"
    )
    edges = [
        name
        for name, value, (lo, hi) in (
            ("compute efficiency", result.compute_efficiency, EFFICIENCY_RANGE),
            ("link bandwidth", result.comm_scale, COMM_RANGE),
            ("call latency", result.call_latency, (None, CALL_LATENCY_RANGE[1])),
        )
        if value in (lo, hi)
    ]
    if edges:  # the model cannot explain the measurements with a plausible value of this factor
        out.print(
            f"warning: {' and '.join(edges)} at the edge of the search range: the cost model misses "
            "something these runs spend time on (see docs/planner.md, limits)"
        )
