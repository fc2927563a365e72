"""Per-GPU memory of a layout: model states, activations, buffers and a stated margin.

Model states follow Rajbhandari et al. 2020 (mixed precision: 2Ψ weights + 2Ψ gradients + KΨ optimizer
with K = 12; fp32: 4Ψ + 4Ψ + 8Ψ), through trainer.analytic. Activations follow Korthikanti et al. 2022
(bytes per layer per micro-batch, 16-bit): sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/(ht))
with tp, sbh/t(34 + 5as/h) with tp + SP; selective recompute drops the 5as/h term (the attention core
is recomputed), full recompute keeps only the block input, 2sbh (2sbh/t with SP), plus one block's
activations while it is recomputed. Under 1F1B the first stage holds min(p, m) micro-batches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.analytic import BYTES, StateBytes, activation_bytes_per_layer, model_state_bytes
from trainer.planner.layouts import Layout
from trainer.planner.shape import ModelShape

# The trainer's ds_config: ZeRO reduce and all-gather buckets of 5e7 elements each (trainer/ds_config.py).
ZERO_BUCKET_ELEMENTS = 5e7


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the most loaded pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # communication buckets (ZeRO) and, under ZeRO-3, one gathered block
    margin: float  # allocator fragmentation + the reserved context (the cluster's stated numbers)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers + self.margin


def layer_activation_bytes(shape: ModelShape, layout: Layout, precision: str) -> float:
    """Activations one block keeps for backward, per micro-batch (Korthikanti et al. 2022, Table 2)."""
    s, b, h, a, t = shape.seq_len, layout.micro_batch, shape.hidden, shape.heads, layout.tp
    sp = layout.sequence_parallel
    scale = BYTES[precision] / 2  # the paper counts 16-bit activations
    if layout.recompute == "none":
        return activation_bytes_per_layer(s, b, h, a, t, sp, precision)
    if layout.recompute == "selective":
        return s * b * h * (34 / t if sp else 10 + 24 / t) * scale
    return 2 * s * b * h / (t if sp else 1) * scale  # full: the block's input only


def activation_bytes(shape: ModelShape, layout: Layout, global_batch: int, precision: str, first: bool) -> float:
    """A stage's activations: its blocks for the micro-batches in flight, the embedding's dropout mask
    (first stage) or the head's input and fp32 logits (last stage: 4sbh/t·(1 + V/h), Korthikanti et al.)."""
    s, b, h, t = shape.seq_len, layout.micro_batch, shape.hidden, layout.tp
    in_flight = min(layout.pp, layout.micro_batches(global_batch)) if first else 1
    blocks = in_flight * (shape.n_layer // layout.pp) * layer_activation_bytes(shape, layout, precision)
    if layout.recompute == "full":  # one block's full activations exist while it is recomputed
        blocks += activation_bytes_per_layer(s, b, h, shape.heads, t, layout.sequence_parallel, precision)
    last = not first or layout.pp == 1
    embedding = in_flight * s * b * h / (t if layout.sequence_parallel else 1) if first else 0.0
    head = 4 * s * b * h / t * (1 + shape.padded_vocab(t) / h) if last else 0.0
    return blocks + embedding + head


def buffer_bytes(shape: ModelShape, layout: Layout, psi: float, precision: str) -> float:
    if layout.zero_stage == 0:
        return 0.0
    buckets = 2 * min(ZERO_BUCKET_ELEMENTS, psi) * 4  # reduce + all-gather buckets, fp32
    if layout.zero_stage == 3:  # the block being computed is gathered in full
        buckets += shape.layer_params / layout.tp * BYTES[precision]
    return buckets


def memory_per_gpu(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str, reserved: float, fragmentation: float
) -> Memory:
    """The larger of the first stage (most activations, the embedding) and the last (the head)."""
    stages = (True, False) if layout.pp > 1 else (True,)
    return max(
        (_stage(shape, layout, global_batch, precision, reserved, fragmentation, f) for f in stages),
        key=lambda m: m.total,
    )


def _stage(shape, layout, global_batch, precision, reserved, fragmentation, first) -> Memory:
    last = not first or layout.pp == 1
    psi = shape.stage_params(layout.tp, layout.pp, first, last)
    states = model_states(psi, layout.dp, layout.zero_stage, precision)
    acts = activation_bytes(shape, layout, global_batch, precision, first)
    buffers = buffer_bytes(shape, layout, psi, precision)
    allocated = states.total + acts + buffers
    margin = allocated * fragmentation + reserved
    return Memory(states.params, states.grads, states.optimizer, acts, buffers, margin)


def model_states(psi: float, dp: int, zero_stage: int, precision: str) -> StateBytes:
    """Rajbhandari et al.'s model states for ``psi`` parameters on one rank. DeepSpeed's ZeRO optimizers
    also step an fp32 partition when the model itself is fp32 (and copy it back), so fp32 at ZeRO >= 1
    carries a 4Ψ/Nd master copy that the paper's 16Ψ leaves out."""
    states = model_state_bytes(psi, dp, zero_stage, precision)
    if precision == "fp32" and zero_stage >= 1:
        return replace(states, optimizer=states.optimizer + 4 * psi / dp)
    return states
