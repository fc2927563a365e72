"""What the planner prints (a rich table, the rejected families, the command) and writes (JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trainer.analysis.planner.layouts import matches, pins_text
from trainer.analysis.planner.predict import Plan, Prediction, rejected_families
from trainer.config.schema import ParallelConfig

GB = 1e9
COLUMNS = (
    "#",
    "tp",
    "pp",
    "dp",
    "ZeRO",
    "micro x accum",
    "recompute",
    "SP",
    "GB/GPU",
    "step s",
    "bubble",
    "tokens/s",
    "TFLOP/s/GPU",
    "MFU",
)


def console() -> Console:
    # Piped output (tests, logs) would otherwise wrap the table at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def architecture(s) -> str:
    """The shape's sizes as the header prints them; a Llama-style model adds its key/value heads, MLP inner
    size and what differs from GPT-2 (e.g. "k=8, f=14336, swiglu, rmsnorm, rope, untied head")."""
    sizes = f"l={s.n_layer}, h={s.n_embd}, a={s.n_head}"
    arch = (s.kv_heads, s.ffn_size, s.mlp, s.norm, s.position, s.bias, s.tie_embeddings)
    if arch != (s.n_head, 4 * s.n_embd, "gelu", "layernorm", "learned", True, True):  # not GPT-2's
        kinds = [s.mlp, s.norm, s.position, *([] if s.bias else ["no biases"])]
        kinds += [] if s.tie_embeddings else ["untied head"]
        sizes += f", k={s.kv_heads}, f={s.ffn_size}, {', '.join(kinds)}"
    return f"{sizes}, s={s.seq_len}, V={s.vocab_size}"


def header(plan: Plan) -> list[str]:
    s, c = plan.shape, plan.cluster
    lines = [
        f"model {s.name}: {s.params() / 1e9:,.2f}B parameters ({architecture(s)})",
        f"cluster {c.name}: {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.world} ranks; per rank "
        f"{c.mem_bytes / GB:.1f} GB, {c.rank_peak(plan.precision) / 1e12:.3g} TFLOP/s {plan.precision} peak, "
        f"matmul efficiency {c.compute_efficiency:.2f}, {c.engine}"
        + (f" (pipeline {c.pipeline_efficiency:.2f})" if c.pipeline_efficiency < 1 else "")
        + (", gradient reduction overlapped with backward" if c.overlap_grad_reduce else "")
        + (f", {c.attention} attention" if c.attention != "auto" else ""),
        f"global batch {plan.global_batch} x {s.seq_len} tokens, {plan.precision}",
    ]
    return lines + [f"  {line}" for line in c.measured]


def layout_table(plan: Plan, rows: list[Prediction], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "recompute" else "right")
    for p in rows:
        lay = p.layout
        table.add_row(
            "–" if p.rank is None else str(p.rank),
            str(lay.tp),
            f"{lay.pp}" + (f" (v{lay.virtual_stages})" if lay.virtual_stages > 1 else ""),
            str(lay.dp),
            str(lay.zero_stage),
            f"{lay.micro_batch} x {lay.micro_batches(plan.global_batch)}",
            lay.recompute,
            "yes" if lay.sequence_parallel else "",
            f"{p.memory.total / GB:.1f}",
            f"{p.time.total:.3g}",
            f"{p.time.bubble:.1%}",
            f"{p.tokens_per_s:,.0f}",
            f"{p.tflops_per_gpu:.3g}",
            f"{p.mfu:.1%}",
        )
    return table


def print_plan(plan: Plan, top: int, rejected_lines: int, model_overrides: list[str], pins: dict | None = None) -> None:
    out = console()
    for line in header(plan):
        out.print(line)
    ranked = plan.ranked
    title = f"top {min(top, len(ranked))} of {len(ranked)} layouts that fit ({len(plan.predictions)} enumerated)"
    out.print(layout_table(plan, ranked[:top], title + ", fastest first"))
    out.print(
        "TFLOP/s/GPU and MFU count model FLOPs (6·(l·W + V·h) + 12·l·s·h per token, W a block's weights; "
        "72·B·s·l·h²(1 + s/6h + V/12lh) for GPT), not recompute"
    )
    if pins:
        print_pinned(out, plan, pins, top)
    print_rejections(out, plan, rejected_lines)
    print_command(out, plan, model_overrides)


def print_pinned(out: Console, plan: Plan, pins: dict, top: int) -> None:
    """The layouts with the pinned degrees (parallel.tp=8 ...): how the fastest of them ranks, and its TFLOP/s
    counting recompute, as Megatron-LM and DeepSpeed's published runs report them."""
    rows = [p for p in plan.predictions if matches(p.layout, pins)]  # the ranked ones first, in rank order
    fitting = [p for p in rows if p.fits]
    title = f"\n{pins_text(pins)}: {len(rows)} layouts, {len(fitting)} fit"
    out.print(layout_table(plan, rows[:top], title))
    if not fitting:
        least, have = min(p.memory.total for p in rows) / GB, plan.cluster.mem_bytes / GB
        out.print(f"none of them fits: the smallest needs {least:.1f} GB per GPU of {have:.1f}")
        return
    first, best = fitting[0], plan.ranked[0]
    out.print(
        f"the fastest of them ranks {first.rank} of {len(plan.ranked)}, "
        f"{1 - first.tokens_per_s / best.tokens_per_s:.1%} slower than #1; "
        f"{first.hw_tflops_per_gpu:.3g} TFLOP/s per GPU counting recompute "
        f"({first.tflops_per_gpu:.3g} model FLOPs)"
    )


def print_rejections(out: Console, plan: Plan, limit: int) -> None:
    rejections = rejected_families(plan)
    if rejections:
        out.print(
            f"\nrejected: what each family needs per GPU at its smallest (over micro-batch, recompute and SP), "
            f"against {plan.cluster.mem_bytes / GB:.1f} GB:"
        )
        for r in rejections[:limit]:
            out.print(f"  {r.line()}")
        if len(rejections) > limit:
            out.print(f"  ... and {len(rejections) - limit} more (plan.rejected={len(rejections)} lists them all)")
    if plan.excluded:
        shown = "; ".join(plan.excluded[:limit]) + ("; ..." if len(plan.excluded) > limit else "")
        out.print(f"\nnot enumerated: {shown}")


def launch_command(plan: Plan, overrides: list[str]) -> str:
    c, args = plan.cluster, " ".join(overrides)
    if c.nodes > 1:
        return f"sbatch --nodes={c.nodes} --gpus-per-node={c.gpus_per_node} launch/slurm.sbatch {args}"
    return f"launch/local.sh {c.gpus_per_node} {args}"


def print_command(out: Console, plan: Plan, model_overrides: list[str]) -> None:
    ranked = plan.ranked
    if not ranked:
        out.print("\nno layout fits: more nodes, a smaller model or a smaller global batch")
        return
    best = ranked[0]
    overrides = model_overrides + best.layout.overrides(plan.global_batch, plan.precision)
    if best.layout.pp > 1 and plan.partition != ParallelConfig.pipeline_partition:  # the stages it was planned for
        overrides.append(f"parallel.pipeline_partition={plan.partition}")
    out.print(f"\nbest layout: {best.tokens_per_s:,.0f} tokens/s, {best.memory.total / GB:.1f} GB per GPU")
    out.print(launch_command(plan, overrides), soft_wrap=True)


def layout_record(plan: Plan, p: Prediction) -> dict:
    lay, mem, t = p.layout, p.memory, p.time
    return {
        "tp": lay.tp,
        "pp": lay.pp,
        "dp": lay.dp,
        "zero_stage": lay.zero_stage,
        "micro_batch": lay.micro_batch,
        "grad_accum": lay.micro_batches(plan.global_batch),
        "recompute": lay.recompute,
        "sequence_parallel": lay.sequence_parallel,
        "virtual_stages": lay.virtual_stages,
        "fits": p.fits,
        "rank": p.rank,
        "mem_per_gpu_gb": mem.total / GB,
        "mem_gb": {
            k: getattr(mem, k) / GB for k in ("weights", "grads", "optimizer", "activations", "buffers", "margin")
        },
        "step_time_s": t.total,
        "time_s": {
            k: getattr(t, k) for k in ("compute", "tp_comm", "pp_comm", "zero_comm", "dp_comm", "optimizer", "engine")
        },
        "bubble": t.bubble,
        "tokens_per_s": p.tokens_per_s,
        "tflops_per_gpu": p.tflops_per_gpu,
        "hw_tflops_per_gpu": p.hw_tflops_per_gpu,
        "mfu": p.mfu,
        "overrides": " ".join(lay.overrides(plan.global_batch, plan.precision)),
    }


def write_json(plan: Plan, path: str, pins: dict | None = None) -> None:
    s, c = plan.shape, plan.cluster
    meta = {
        "model": {"name": s.name, **s.meta(), "params": s.params()},  # sizes and architecture (k, f resolved)
        "cluster": {
            "name": c.name,
            "nodes": c.nodes,
            "gpus_per_node": c.gpus_per_node,
            "world": c.world,
            "mem_per_gpu_gb": c.mem_bytes / GB,
            "compute_efficiency": c.compute_efficiency,
            "engine": c.engine,
            "pipeline_efficiency": c.pipeline_efficiency,
            "overlap_grad_reduce": c.overlap_grad_reduce,
            "attention": c.attention,
            "measured": list(c.measured),
        },
        "global_batch": plan.global_batch,
        "precision": plan.precision,
        "excluded": plan.excluded,
        "pinned": pins or {},  # the degrees the command line pinned (the layouts with them: filter on them)
    }
    record = {"meta": meta, "layouts": [layout_record(plan, p) for p in plan.predictions]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
