"""Per-GPU memory of a layout: model states, activations, buffers and a stated margin.

Model states follow Rajbhandari et al. 2020 (mixed precision: 2Ψ weights + 2Ψ gradients + KΨ optimizer
with K = 12; fp32: 4Ψ + 4Ψ + 8Ψ), through trainer.analysis.formulas, with Ψ the stage's share of the
shape's parameters (``ModelShape.rank_params`` of the stage's positions: GQA's narrower QKV, SwiGLU's three
matrices, an untied head).
Activations follow Korthikanti et al. 2022 (bytes per layer per micro-batch, 16-bit): sbh(10 + S + 5as/h)
without parallelism, sbh(10 + S/t + 5as/(ht)) with tp, sbh/t(10 + S + 5as/h) with tp + SP, where S is the
tp-split part (24 for GPT, ``formulas.split_activations`` for GQA, SwiGLU and rotary positions); selective
recompute drops the 5as/h term (the attention core is recomputed), full recompute keeps only the block
input, 2sbh (2sbh/t with SP), plus one block's activations while it is recomputed. Under 1F1B stage i
holds min(p - i, m) micro-batches in flight. Stages are cut as the engine cuts them (``stages.py``: DeepSpeed's
parameter-balanced or uniform partition for this trainer, any pp <= l; Megatron-LM's even split), and the
most loaded stage is reported.

Buffers are what DeepSpeed (0.19) allocates beside the model states, sized by the trainer's ds_config:
ZeRO-1/2 reduce gradients through one bucket and all-gather updated weights straight into the flat
weight group; ZeRO-3 also keeps gathered weights live (up to ``stage3_max_live_parameters``) and
gathers up to ``stage3_prefetch_bucket_size`` at once; the optimizer step adds a temporary the size of
what it steps at once (``sub_group_size`` at ZeRO-3). A backend that cannot gather or reduce-scatter in
the caller's buffers adds temporaries per byte moved (``Collectives``; gloo on CPU, measured).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.analysis.formulas import BYTES, shape_activation_bytes, zero_state_bytes
from trainer.analysis.planner.layouts import Layout
from trainer.analysis.planner.stages import Stage, even_stage, memory_candidates, pipeline_stages, shards_optimizer
from trainer.model.shape import ModelShape
from trainer.runtime.ds_config import ZERO3_MAX_LIVE_PARAMETERS, ZERO3_SUB_GROUP_ELEMENTS, ZERO_BUCKET_ELEMENTS


@dataclass(frozen=True)
class Collectives:
    """Memory a backend's all-gather / reduce-scatter allocate beyond the caller's buffers, per byte of
    the gathered output / scattered input, as it stays resident over a training run. NCCL works in the
    caller's buffers (0, 0). gloo on CPU copies through per-rank temporaries that the C allocator keeps
    (measured by trainer.analysis.planner.localbench: about 4 and 2.5)."""

    gather: float = 0.0
    scatter: float = 0.0


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the most loaded pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    # ZeRO: the reduce bucket, the step's temporary, the backend's collective temporaries, ZeRO-3's gathered weights
    buffers: float
    margin: float  # allocator fragmentation + the reserved context (the cluster's stated numbers)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers + self.margin


def layer_activation_bytes(shape: ModelShape, layout: Layout, precision: str, scores: bool = True) -> float:
    """Activations one block keeps for backward, per micro-batch (``formulas.shape_activation_bytes``): all of
    them, all but the attention scores (selective: sbh(10 + 24/t) for GPT, 34sbh/t with SP; what a fused
    attention kernel keeps anyway: ``scores=False``, ``stages.keeps_attention_scores``), or the block's input
    alone (full)."""
    b, t, sp = layout.micro_batch, layout.tp, layout.sequence_parallel
    return shape_activation_bytes(shape, b, t, sp, precision, scores, layout.recompute)


def activation_bytes(
    shape: ModelShape,
    layout: Layout,
    global_batch: int,
    precision: str,
    first: bool,
    stage: Stage | None = None,
    scores: bool = True,
) -> float:
    """A stage's activations: its blocks for the micro-batches in flight (pp - stage index under 1F1B), the
    embedding's dropout mask (first stage) or the head's input and fp32 logits (last stage: 4sbh/t·(1 + V/h),
    Korthikanti et al.; the same for a tied or an untied head). ``stage``: which one (default: the first or the
    last of an even split, as ``first`` says); ``scores``: whether attention keeps its s×s scores."""
    s, b, h, t = shape.seq_len, layout.micro_batch, shape.n_embd, layout.tp
    stage = stage or even_stage(shape, layout.pp, first)
    in_flight = stage.in_flight(layout.pp, layout.micro_batches(global_batch))
    blocks = in_flight * stage.blocks * layer_activation_bytes(shape, layout, precision, scores)
    # Megatron-LM's interleaved schedule warms up further: (1 + (p - 1)/(p·v)) times (Korthikanti et al. 2022)
    blocks *= 1 + (layout.pp - 1) / (layout.pp * layout.virtual_stages) if layout.virtual_stages > 1 else 1
    if layout.recompute == "full" and stage.blocks:  # one block's full activations exist while it is recomputed
        blocks += shape_activation_bytes(shape, b, t, layout.sequence_parallel, precision, scores)
    embedding = in_flight * s * b * h / (t if layout.sequence_parallel else 1) if stage.first else 0.0
    head = head_bytes(shape, layout, precision) if stage.last else 0.0
    return blocks + embedding + head


def head_bytes(shape: ModelShape, layout: Layout, precision: str) -> float:
    """The head's input and its fp32 logits, 4sbh/t·(1 + V/h) (Korthikanti et al.); with ``layout.fused_loss`` the
    logits give way to the gradients the chunked head computes in forward, of its input (s·b·h) and of its weight
    (V/t·h) (trainer.model.fused_loss)."""
    s, b, h, t = shape.seq_len, layout.micro_batch, shape.n_embd, layout.tp
    vocab = shape.padded_vocab(t)
    if layout.fused_loss:
        return 4 * s * b * h / t + (s * b * h + vocab / t * h) * BYTES[precision]
    return 4 * s * b * h / t * (1 + vocab / h)


def buffer_bytes(
    layout: Layout, psi: float, precision: str, collectives: Collectives = Collectives(), largest: float = 0.0
) -> float:
    """DeepSpeed's ZeRO buffers on a rank whose stage holds ``psi`` parameters (before dp partitioning),
    the largest of them ``largest`` elements. Only touched memory counts: a CPU rank never faults in the
    unused tail of an oversized bucket."""
    if layout.zero_stage == 0:
        return 0.0
    nbytes = BYTES[precision]
    bucket = min(ZERO_BUCKET_ELEMENTS, psi)
    step = step_bytes(layout, psi)
    if layout.zero_stage < 3:  # one all-gather of the whole updated weight group per step
        return bucket * nbytes + step + collectives.gather * psi * nbytes
    # ZeRO-3 all-gathers up to a prefetch bucket at a time, keeps what it gathered live until it is
    # used again (the trainer keeps DeepSpeed's reuse distance), and reduce-scatters each full bucket.
    # One parameter larger than that (the vocabulary embedding) is gathered, and its gradient
    # reduce-scattered, whole; the backend's temporaries stay bucket-sized (on gloo the trainer runs
    # larger collectives in pieces: trainer.runtime.compat.bound_gloo_collectives).
    live = max(min(ZERO3_MAX_LIVE_PARAMETERS, psi), largest) * nbytes
    gradient = max(bucket, largest) * nbytes
    return gradient + step + live + (collectives.gather + collectives.scatter) * bucket * nbytes


def step_bytes(layout: Layout, psi: float) -> float:
    """The optimizer step's temporary: AdamW allocates one fp32 tensor the size of what it steps at once
    (its denominator), which is a rank's whole partition at ZeRO-1/2 and one sub-group of it at ZeRO-3."""
    partition = psi / layout.dp
    if layout.zero_stage == 3:
        partition = min(ZERO3_SUB_GROUP_ELEMENTS, partition)
    return BYTES["fp32"] * partition


def memory_per_gpu(
    shape: ModelShape,
    layout: Layout,
    global_batch: int,
    precision: str,
    reserved: float,
    fragmentation: float,
    collectives: Collectives = Collectives(),
    partition: str = "parameters",
    scores: bool = True,
    engine: str = "megatron",
) -> Memory:
    """The most loaded stage of the layout as ``partition`` cuts it ("parameters" or "uniform": DeepSpeed's
    partitioner, as the trainer runs it; "even": Megatron-LM's). Candidates: the first stage (most micro-batches
    in flight, the embedding), the last (the head) and the earliest middle stage of each block count.
    ``scores``: whether attention keeps its s×s scores (``stages.keeps_attention_scores`` of the engine);
    ``engine``: whose optimizer holds the states (``stages.shards_optimizer``: DeepSpeed's bf16 pipeline shards
    them at ZeRO-0 too)."""
    stages = memory_candidates(pipeline_stages(shape, layout.tp, layout.pp, partition))
    args = (shape, layout, global_batch, precision, reserved, fragmentation, collectives, scores, engine)
    return max((stage_memory(*args, stage=st) for st in stages), key=lambda m: m.total)


def stage_memory(
    shape, layout, global_batch, precision, reserved, fragmentation, collectives, scores, engine, stage: Stage
) -> Memory:
    """One stage's bytes per GPU (``memory_per_gpu``'s arguments; ``stages.pipeline_stages`` gives the stages)."""
    sharded = layout.zero_stage == 0 and shards_optimizer(engine, precision, layout.pp, 0)
    psi = shape.padded(layout.tp).rank_params(layout.tp, stage.positions)
    states = zero_state_bytes(psi, layout.dp, 1 if sharded else layout.zero_stage, precision)
    acts = activation_bytes(shape, layout, global_batch, precision, stage.first, stage, scores)
    largest = shape.largest_tensor(layout.tp, embedding=stage.first or stage.last)
    buffers = buffer_bytes(layout, psi, precision, collectives, largest)
    if sharded:  # BF16_Optimizer: a second, flat gradient copy; ZeRO-1's step temporary, no reduce bucket
        states = replace(states, grads=2 * states.grads)
        buffers = step_bytes(replace(layout, zero_stage=1), psi)
    allocated = states.total + acts + buffers
    margin = allocated * fragmentation + reserved
    return Memory(states.params, states.grads, states.optimizer, acts, buffers, margin)
