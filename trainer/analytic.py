"""The analytic model of a training step: FLOPs, memory and communication per rank.

Every measured number the trainer reports has its prediction here, from the papers the layouts
come from. Units: elements or bytes as named; l layers, h hidden, a heads, s sequence, V vocabulary,
b micro-batch, t tensor-parallel degree, Ψ parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def flops_per_token(l: int, h: int, s: int, V: int, recompute: bool = False) -> float:
    """Model FLOPs per trained token (Narayanan et al. 2021, eq. 3, divided by B·s):
    72·l·h²·(1 + s/(6h) + V/(12·l·h)); with full activation recomputation the forward runs twice
    and 72 becomes 96 (and V/(12lh) becomes V/(16lh): the head is not recomputed)."""
    if recompute:
        return 96 * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


@dataclass(frozen=True)
class StateBytes:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(psi: float, dp: int, zero_stage: int, precision: str = "fp32") -> StateBytes:
    """Parameters, gradients and Adam states per rank (Rajbhandari et al. 2020, section 3.1).

    Mixed precision (bf16/fp16): 2Ψ + 2Ψ + KΨ with K = 12 (fp32 master weights, momentum,
    variance). fp32: 4Ψ + 4Ψ + 8Ψ (no master copy). ZeRO-1 divides the optimizer term by the
    data-parallel degree Nd, ZeRO-2 also the gradients, ZeRO-3 also the parameters. ``psi`` is the
    parameter count of this rank's model shard (Ψ / (tp·pp) under model parallelism).
    """
    p_bytes = BYTES[precision]
    k = 8 if precision == "fp32" else 12
    params, grads, optimizer = p_bytes * psi, p_bytes * psi, k * psi
    if zero_stage >= 1:
        optimizer /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        params /= dp
    return StateBytes(params, grads, optimizer)


def activation_bytes_per_layer(
    s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False, precision: str = "bf16"
) -> float:
    """Activations one transformer layer keeps for backward (Korthikanti et al. 2022, eqs. 1-4).

    In 16-bit: s·b·h·(34 + 5·a·s/h) without parallelism; s·b·h·(10 + 24/t + 5·a·s/(h·t)) with
    tensor parallelism; s·b·h/t·(34 + 5·a·s/h) with sequence parallelism as well. The constants
    count 2-byte activations (and 1-byte dropout masks); fp32 doubles the 2-byte terms, which we
    approximate by scaling the whole expression by 2.
    """
    if sequence_parallel:
        per_token = (34 + 5 * a * s / h) / t
    else:
        per_token = 10 + 24 / t + 5 * a * s / (h * t)
    scale = BYTES[precision] / 2
    return s * b * h * per_token * scale


def ring_bytes(message_bytes: float, n: int, kind: str) -> float:
    """Bytes each rank sends for one collective on a ring of ``n`` ranks over a message of
    ``message_bytes`` (the full buffer): all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n."""
    if n <= 1:
        return 0.0
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind]
    return factor * (n - 1) / n * message_bytes


def dp_comm_bytes_per_step(psi: float, dp: int, zero_stage: int, grad_bytes: int = 4) -> float:
    """Bytes a rank sends per optimizer step for data parallelism (Rajbhandari et al. 2020, 7.1):
    stages 0-2 move 2Ψ (reduce-scatter + all-gather = one all-reduce), stage 3 moves 3Ψ (an extra
    parameter all-gather in the backward pass)."""
    volume = 3.0 if zero_stage == 3 else 2.0
    return volume * (dp - 1) / dp * psi * grad_bytes if dp > 1 else 0.0


def tp_comm_bytes_per_micro_batch(l: int, b: int, s: int, h: int, t: int, act_bytes: int = 4) -> float:
    """Bytes a rank sends per micro-batch for tensor parallelism: 4 all-reduces of b·s·h per layer
    (2 forward, 2 backward); sequence parallelism replaces each by an all-gather + reduce-scatter
    pair of the same total volume."""
    return 4 * l * ring_bytes(b * s * h * act_bytes, t, "all_reduce")


def pp_comm_bytes_per_micro_batch(b: int, s: int, h: int, pp: int, act_bytes: int = 4) -> float:
    """Bytes one stage boundary carries per micro-batch: the activation forward, its gradient back."""
    return 2 * b * s * h * act_bytes if pp > 1 else 0.0


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Bubble time over ideal compute time for 1F1B/GPipe: (p-1)/m (Narayanan et al. 2021)."""
    return (pp - 1) / micro_batches
