"""Memory and step time of every layout, the ranking of those that fit, and why the rest do not."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from trainer.analysis.formulas import shape_flops_per_token
from trainer.analysis.planner.cluster import ClusterSpec
from trainer.analysis.planner.costmodel import StepTime, executed_flops_per_step, step_time
from trainer.analysis.planner.layouts import Layout, enumerate_layouts, interleave
from trainer.analysis.planner.memory import Memory, memory_per_gpu
from trainer.analysis.planner.stages import partition_method
from trainer.config.schema import lean_heap
from trainer.model.shape import ModelShape


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: Memory
    time: StepTime
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (shape_flops_per_token; GPT 72·B·s·l·h²(...), no recompute) per s per GPU
    hw_tflops_per_gpu: float  # executed FLOPs, recompute included (Megatron-LM's reported convention)
    mfu: float  # tflops_per_gpu / peak
    fits: bool
    rank: int | None = None  # 1 = fastest of those that fit


@dataclass
class Plan:
    shape: ModelShape
    cluster: ClusterSpec
    global_batch: int
    precision: str
    predictions: list[Prediction]  # ranked ones first, in rank order; then the rest
    excluded: list[str]
    partition: str = "parameters"  # parallel.pipeline_partition the predictions assume

    @property
    def ranked(self) -> list[Prediction]:
        return [p for p in self.predictions if p.rank is not None]


def predict(
    shape: ModelShape,
    layout: Layout,
    global_batch: int,
    precision: str,
    cluster: ClusterSpec,
    partition: str = "parameters",
) -> Prediction:
    """``partition``: the trainer's ``parallel.pipeline_partition`` (the engine decides: a ``megatron`` cluster
    cuts evenly whatever it says)."""
    method = partition_method(cluster.engine, partition)
    # A lean C heap (the trainer's default for CPU ranks at ZeRO-3) hands freed memory back: no slack.
    lean = lean_heap("auto", cluster.cpu, layout.zero_stage)
    fragmentation = 0.0 if lean else cluster.fragmentation
    memory = memory_per_gpu(
        shape,
        layout,
        global_batch,
        precision,
        cluster.reserved_bytes,
        fragmentation,
        cluster.collectives,
        method,
        cluster.keeps_scores,
        cluster.engine,
    )
    time = step_time(shape, layout, global_batch, precision, cluster, method)
    world = layout.tp * layout.pp * layout.dp
    tokens = global_batch * shape.seq_len
    model_flops = tokens * shape_flops_per_token(shape, shape.padded_vocab(layout.tp))
    tflops = model_flops / world / time.total / 1e12
    hw = executed_flops_per_step(shape, layout, global_batch) / world / time.total / 1e12
    mfu = tflops * 1e12 / cluster.rank_peak(precision)
    fits = memory.total <= cluster.mem_bytes
    return Prediction(layout, memory, time, tokens / time.total, tflops, hw, mfu, fits)


def make_plan(
    shape: ModelShape,
    cluster: ClusterSpec,
    global_batch: int,
    precision: str,
    partition: str = "parameters",
    virtual_stages: int = 1,
    fused_loss: bool = False,
) -> Plan:
    """Every layout predicted and ranked; ``virtual_stages`` > 1: pipelined layouts run Megatron-LM's interleaved
    schedule with that many chunks per stage where it can (``layouts.interleave``); ``fused_loss``: every layout
    computes its head and loss in chunks (``speed.fused_loss``)."""
    method = partition_method(cluster.engine, partition)
    found = enumerate_layouts(shape, cluster.world, cluster.gpus_per_node, global_batch, method)
    layouts = [interleave(layout, shape, global_batch, virtual_stages) for layout in found.layouts]
    layouts = [replace(layout, fused_loss=fused_loss) for layout in layouts]
    predictions = [predict(shape, layout, global_batch, precision, cluster, partition) for layout in layouts]
    return Plan(shape, cluster, global_batch, precision, rank(predictions), found.excluded, partition)


def rank(predictions: list[Prediction]) -> list[Prediction]:
    """Fastest first among those that fit; equal speed goes to the smaller footprint (more headroom)."""
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: (-p.tokens_per_s, p.memory.total))
    ranked = [replace(p, rank=i) for i, p in enumerate(fitting, start=1)]
    return ranked + [p for p in predictions if not p.fits]


@dataclass(frozen=True)
class Rejection:
    """A (tp, pp) pair and, per ZeRO stage none of whose layouts fits, the smallest footprint it has."""

    tp: int
    pp: int
    needs: tuple[tuple[int, float], ...]  # (ZeRO stage, bytes per GPU of its smallest layout)

    def line(self) -> str:
        needs = ", ".join(f"ZeRO-{zero} {_size(nbytes)}" for zero, nbytes in self.needs)
        return f"tp{self.tp} pp{self.pp}: {needs}"


def rejected_families(plan: Plan) -> list[Rejection]:
    """Every (tp, pp, ZeRO stage) family of which no layout fits, grouped by (tp, pp)."""
    least: dict[tuple[int, int, int], float] = {}
    fitting: set[tuple[int, int, int]] = set()
    for p in plan.predictions:
        family = p.layout.family
        least[family] = min(least.get(family, float("inf")), p.memory.total)
        if p.fits:
            fitting.add(family)
    by_pair: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for (tp, pp, zero), nbytes in sorted(least.items()):
        if (tp, pp, zero) not in fitting:
            by_pair[(tp, pp)].append((zero, nbytes))
    return [Rejection(tp, pp, tuple(needs)) for (tp, pp), needs in by_pair.items()]


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e12:.2f} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.1f} GB"
