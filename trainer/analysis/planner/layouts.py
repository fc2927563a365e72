"""Every layout the trainer accepts for a model on a cluster, and the command line that runs one.

Rules (the trainer's validate() plus the planner's own): tp divides the GPUs per node (a tp group stays
inside a node), the query heads, the key/value heads and the MLP's inner size; pp <= the layers (DeepSpeed's
partitioner cuts uneven stages, ``stages.py``; Megatron-LM's even split, the "even" method, needs pp to divide
them); dp = world / (tp·pp) divides the global batch; ZeRO-2/3 only without a pipeline; the
micro-batch divides the per-replica batch (integer gradient accumulation); sequence parallelism only at tp > 1
with seq_len divisible by tp.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trainer.analysis.planner.stages import pipeline_refusal
from trainer.config.schema import ZERO_STAGES
from trainer.config.validate import parallel_overrides
from trainer.model.shape import RECOMPUTE, ModelShape


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    recompute: str  # none | selective (attention core, Korthikanti et al. 2022) | full (every block's input)
    sequence_parallel: bool
    # Megatron-LM's interleaved 1F1B: model chunks per pipeline stage (its virtual stages). DeepSpeed's pipeline
    # engine, the trainer's, has none: 1 in every layout the planner enumerates unless a plan asks (``interleave``).
    virtual_stages: int = 1
    # speed.fused_loss: the head and the loss in chunks (trainer.model.fused_loss), no whole logits kept. A run's
    # setting, not a degree the planner chooses: memory only (activation_bytes).
    fused_loss: bool = False

    def micro_batches(self, global_batch: int) -> int:
        """m: micro-batches per step and replica (the gradient accumulation steps)."""
        return global_batch // (self.micro_batch * self.dp)

    @property
    def family(self) -> tuple[int, int, int]:
        return self.tp, self.pp, self.zero_stage

    def overrides(self, global_batch: int, precision: str) -> list[str]:
        """The trainer's Hydra overrides for this layout (trainer.config.schema.ParallelConfig's field names)."""
        return parallel_overrides(
            tp=self.tp,
            pp=self.pp,
            zero_stage=self.zero_stage,
            micro_batch=self.micro_batch,
            global_batch=global_batch,
            sequence_parallel=self.sequence_parallel,
            recompute=self.recompute,
            precision=precision,
        )


@dataclass
class Enumeration:
    layouts: list[Layout]
    excluded: list[str] = field(default_factory=list)  # degrees refused before any prediction, and why


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_refusal(shape: ModelShape, tp: int) -> str | None:
    """Why the model cannot be split over ``tp`` ranks (the trainer's rule: whole query heads, whole key/value
    heads and an even share of the MLP's inner size on every rank), or None."""
    if shape.n_head % tp:
        return f"does not divide {shape.n_head} heads"
    if shape.kv_heads % tp:
        return f"does not divide {shape.kv_heads} key/value heads"
    if shape.ffn_size % tp:
        return f"does not divide the MLP's inner size {shape.ffn_size}"
    return None


def tensor_degrees(shape: ModelShape, gpus_per_node: int, excluded: list[str]) -> list[int]:
    degrees = []
    for tp in divisors(gpus_per_node):
        refusal = tp_refusal(shape, tp)
        if refusal:
            excluded.append(f"tp={tp}: {refusal}")
        else:
            degrees.append(tp)
    return degrees


def pipeline_degrees(
    shape: ModelShape, world: int, tp: int, excluded: list[str], method: str = "parameters"
) -> list[int]:
    """Degrees that divide the ranks left after tp and that the engine can cut the model into (``method``:
    "parameters" / "uniform", DeepSpeed's partitioner: any pp <= n_layer; "even": pp divides n_layer); the
    others are noted once."""
    degrees = []
    for pp in divisors(world // tp):
        refusal = pipeline_refusal(shape, pp, method)
        if refusal is None:
            degrees.append(pp)
            continue
        note = f"pp={pp}: {refusal}"
        if note not in excluded:
            excluded.append(note)
        if pp > shape.n_layer:
            break
    return degrees


def dp_multiple(shape: ModelShape, world: int, gpus_per_node: int, method: str = "parameters") -> int:
    """The smallest data-parallel degree any (tp, pp) of this model leaves of ``world`` ranks: a global batch
    that is a multiple of it has a layout."""
    return min(
        world // (tp * pp)
        for tp in range(1, gpus_per_node + 1)
        for pp in range(1, shape.n_layer + 1)
        if world % (tp * pp) == 0
        and gpus_per_node % tp == 0
        and tp_refusal(shape, tp) is None
        and pipeline_refusal(shape, pp, method) is None
    )


def enumerate_layouts(
    shape: ModelShape, world: int, gpus_per_node: int, global_batch: int, method: str = "parameters"
) -> Enumeration:
    excluded = [f"tp > {gpus_per_node}: tensor parallelism stays inside a node"] if world > gpus_per_node else []
    layouts: list[Layout] = []
    for tp in tensor_degrees(shape, gpus_per_node, excluded):
        for pp in pipeline_degrees(shape, world, tp, excluded, method):
            dp = world // (tp * pp)
            if global_batch % dp:
                excluded.append(f"tp={tp} pp={pp}: dp={dp} does not divide the global batch {global_batch}")
                continue
            layouts += _knobs(shape, tp, pp, dp, global_batch)
    return Enumeration(layouts, excluded)


def interleave(layout: Layout, shape: ModelShape, global_batch: int, v: int) -> Layout:
    """``layout`` with ``v`` virtual stages where Megatron-LM's interleaved schedule can run it (pp > 1, v chunks
    of whole layers per stage, micro-batches a multiple of pp); else unchanged."""
    p, m = layout.pp, layout.micro_batches(global_batch)
    if v > 1 and p > 1 and shape.n_layer % (p * v) == 0 and m % p == 0:
        return replace(layout, virtual_stages=v)
    return layout


# The degrees a plan may pin (the trainer's parallel.* keys, as Layout names them)
PIN_KEYS = ("tp", "pp", "zero_stage", "micro_batch", "recompute", "sequence_parallel")


def matches(layout: Layout, pins: dict) -> bool:
    """``layout`` has every pinned degree."""
    return all(getattr(layout, key) == value for key, value in pins.items())


def pins_text(pins: dict) -> str:
    """The pinned degrees as the command line gives them."""
    return " ".join(f"{key}={word(value)}" for key, value in pins.items())


def pin_refusal(found: Enumeration, pins: dict, world: int) -> tuple[str, str] | None:
    """None when some enumerated layout has the pinned degrees; else (the key, why): the first pin no layout has
    on its own (with the enumeration's note on that degree, if there is one), or the last one if only their
    combination is missing."""
    given: dict = {}
    for key, value in pins.items():
        given[key] = value
        if any(matches(layout, given) for layout in found.layouts):
            continue
        if len(given) > 1 and any(matches(layout, {key: value}) for layout in found.layouts):
            others = pins_text({k: v for k, v in given.items() if k != key})
            return key, f"no layout of {world} ranks has it together with {others}"
        possible = ", ".join(word(v) for v in sorted({getattr(layout, key) for layout in found.layouts}))
        note = next((n.split(": ", 1)[1] for n in found.excluded if f"{key}={value}:" in n), None)
        return key, f"{note or f'no layout of {world} ranks at this global batch has it'}; possible: {possible}"
    return None


def word(value) -> str:
    """A degree as the command line spells it (true / false for SP)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _knobs(shape: ModelShape, tp: int, pp: int, dp: int, global_batch: int) -> list[Layout]:
    """Every ZeRO stage, micro-batch, recompute and SP choice of one (tp, pp, dp)."""
    stages = (0, 1) if pp > 1 else ZERO_STAGES  # DeepSpeed's pipeline engine: ZeRO 0 or 1 only
    sp_choices = (False, True) if tp > 1 and shape.seq_len % tp == 0 else (False,)
    return [
        Layout(tp, pp, dp, zero, micro, recompute, sp)
        for zero in stages
        for micro in divisors(global_batch // dp)
        for recompute in RECOMPUTE
        for sp in sp_choices
    ]
