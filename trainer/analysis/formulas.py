"""The analytic model of a training step: FLOPs, memory and communication per rank.

Every measured number the trainer reports has its prediction here, from the papers the layouts
come from. Units: elements or bytes as named; l layers, h hidden, a heads, s sequence, V vocabulary,
b micro-batch, t tensor-parallel degree, Ψ parameters; for Llama-style models k key/value heads, d = h/a
the head size, f the MLP's inner size (``trainer.model.shape.ModelShape``, which the ``shape_*`` functions
read: the papers' GPT formulas are their k = a, f = 4h, learned-position case).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.runtime.ds_config import ZERO3_MAX_LIVE_PARAMETERS

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def flops_per_token(
    l: int, h: int, s: int, V: int, recompute: bool = False, block_weights: float | None = None
) -> float:
    """Model FLOPs per trained token (Narayanan et al. 2021, eq. 3, divided by B·s):
    72·l·h²·(1 + s/(6h) + V/(12·l·h)); with full activation recomputation the forward runs twice
    and 72 becomes 96 (and V/(12lh) becomes V/(16lh): the head is not recomputed).

    In the form that holds for any block: 2·passes·l·(W + 2sh) + 6Vh, with W the elements of one block's
    weight matrices (``block_weights``; 12h² for GPT, ``ModelShape.block_weights()`` for SwiGLU and
    grouped-query attention) and passes = 3 (forward, backward 2×) or 4 with recomputation. The attention
    core's 2sh term counts query heads only, so grouped-query attention leaves it as it is.
    """
    W = 12 * h * h if block_weights is None else block_weights
    passes = 4 if recompute else 3
    return 2 * passes * l * (W + 2 * s * h) + 6 * V * h


def shape_flops_per_token(shape, V: int | None = None, recompute: bool = False) -> float:
    """``flops_per_token`` of a ``ModelShape`` (vocabulary ``V``, default the shape's own)."""
    V = shape.vocab_size if V is None else V
    return flops_per_token(shape.n_layer, shape.n_embd, shape.seq_len, V, recompute, shape.block_weights())


@dataclass(frozen=True)
class StateBytes:
    params: float
    grads: float
    optimizer: float  # the whole K·Ψ term: Adam's two moments plus the fp32 master copy, if any
    master: float = 0.0  # the part of ``optimizer`` that is the fp32 master copy of the parameters

    @property
    def states(self) -> float:
        """Adam's moments alone (exp_avg, exp_avg_sq): 8 bytes per parameter, before partitioning."""
        return self.optimizer - self.master

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(
    psi: float, dp: int, zero_stage: int, precision: str = "fp32", master_copy: bool | None = None
) -> StateBytes:
    """Parameters, gradients and Adam states per rank (Rajbhandari et al. 2020, section 3.1).

    Mixed precision (bf16/fp16): 2Ψ + 2Ψ + KΨ with K = 12 (fp32 master weights, momentum,
    variance). fp32: 4Ψ + 4Ψ + 8Ψ (no master copy). ZeRO-1 divides the optimizer term by the
    data-parallel degree Nd, ZeRO-2 also the gradients, ZeRO-3 also the parameters. ``psi`` is the
    parameter count of this rank's model shard (Ψ / (tp·pp) under model parallelism).

    ``master_copy`` overrides whether an fp32 master copy exists (default: only in mixed precision).
    DeepSpeed's ZeRO optimizers keep one even when the model is fp32 (they step an fp32 partition and
    copy it back), so at ZeRO >= 1 in fp32 the optimizer term is 12Ψ/Nd, not 8Ψ/Nd.
    """
    p_bytes = BYTES[precision]
    has_master = precision != "fp32" if master_copy is None else master_copy
    master = 4 * psi if has_master else 0.0
    params, grads, optimizer = p_bytes * psi, p_bytes * psi, 8 * psi + master
    if zero_stage >= 1:
        optimizer /= dp
        master /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        params /= dp
    return StateBytes(params, grads, optimizer, master)


def has_master_copy(precision: str, zero_stage: int) -> bool:
    """Whether DeepSpeed (0.19) keeps an fp32 copy of the parameters beside the model's own.

    Mixed precision always does (bf16/fp16 weights, fp32 master weights). In fp32 the ZeRO-1/2 optimizers
    still step a cloned fp32 partition and copy it back; ZeRO-3 steps its fp32 parameter partition in
    place (DeepSpeed means to, and the trainer makes it: ``compat.share_zero3_fp32_partitions``); ZeRO-0
    steps the parameters themselves.
    """
    return precision != "fp32" or zero_stage in (1, 2)


def zero_state_bytes(psi: float, dp: int, zero_stage: int, precision: str) -> StateBytes:
    """``model_state_bytes`` with the master copy DeepSpeed really keeps (``has_master_copy``): what the
    comparison report measures against and the planner predicts."""
    return model_state_bytes(psi, dp, zero_stage, precision, has_master_copy(precision, zero_stage))


# Korthikanti et al.'s per-token bytes (in units of h, 16-bit) that tensor parallelism leaves whole: each norm's
# input (2 + 2), the QKV and the MLP input layers' inputs (2 + 2), the attention-output and MLP-output dropout
# masks (1 + 1). The same for LayerNorm and RMSNorm: a fused kernel (LayerNorm everywhere, RMSNorm on CUDA)
# keeps its input and a per-token statistic. torch's CPU RMSNorm is unfused and also keeps x·rsqrt (+2 per norm,
# not counted). The masks are counted whatever the dropout (the convention kept from the paper, not modelled
# per run): at the trainer's default dropout 0 none is stored, and the count is 2 high.
REPLICATED_ACTIVATIONS = 10.0


def activation_bytes_per_layer(
    s: int,
    b: int,
    h: int,
    a: int,
    t: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    scores: bool = True,
    split: float = 24.0,
) -> float:
    """Activations one transformer layer keeps for backward (Korthikanti et al. 2022, eqs. 1-4).

    In 16-bit: s·b·h·(34 + 5·a·s/h) without parallelism; s·b·h·(10 + 24/t + 5·a·s/(h·t)) with
    tensor parallelism; s·b·h/t·(34 + 5·a·s/h) with sequence parallelism as well. The constants
    count 2-byte activations (and 1-byte dropout masks); fp32 doubles the 2-byte terms, which we
    approximate by scaling the whole expression by 2.

    ``split`` is the part of the 34 that tensor parallelism divides (24 for GPT; ``split_activations``
    derives it for any ``ModelShape``, ``shape_activation_bytes`` passes it); the other 10 (the two norms'
    inputs, the QKV and MLP inputs, two dropout masks: ``REPLICATED_ACTIVATIONS``) are the same for every
    architecture. In general: s·b·h·(10 + S + 5as/h), s·b·h·(10 + S/t + 5as/(ht)), s·b·h/t·(10 + S + 5as/h).

    ``scores=False`` drops the 5·a·s/h term (the s×s attention scores, softmax output and its dropout
    mask): fused attention kernels (flash / memory-efficient, and torch's CPU flash kernel) keep only
    the output and a log-sum-exp per row, which is the paper's "selective recomputation" count.
    """
    attention = 5 * a * s / h if scores else 0.0
    if sequence_parallel:
        per_token = (REPLICATED_ACTIVATIONS + split + attention) / t
    else:
        per_token = REPLICATED_ACTIVATIONS + split / t + attention / t
    scale = BYTES[precision] / 2
    return s * b * h * per_token * scale


def split_activations(shape) -> float:
    """The tp-split per-token bytes of one block's activations, in units of h (16-bit): the 24 of
    Korthikanti et al.'s 10 + 24/t for GPT, term by term for any ``ModelShape`` (k key/value heads of d,
    f the MLP's inner size):

        Q (QKᵀ's left input)                          2·a·d = 2h
        K (QKᵀ's right input) and V (the AV input)    2·2·k·d = 4h·k/a    (grouped-query attention: k < a)
        the attention projection's input             2h
        rotary positions: QKᵀ's inputs are rotated copies of q and k, while V, a slice of the fused QKV
          output, keeps that whole output alive: q and k are held twice  2·(a + k)·d = 2h·(1 + k/a)
        GELU MLP: fc1's output (GELU's input) and GELU's output, f each          2·2f = 4f
        SwiGLU MLP: fc1's 2f-wide output (gate and up: silu's and the product's inputs), silu's output and
          the product (fc2's input), f each                                    2·4f = 8f

    GPT (k = a, f = 4h, learned positions): 2 + 4 + 2 + 16 = 24. Llama 3 8B (k/a = 1/4, f = 3.5h, rotary):
    2 + 1 + 2 + 2.5 + 28 = 35.5. The rotary term is how this trainer (``trainer.model.gpt.CausalSelfAttention``)
    and Megatron-LM's unfused rotary path keep q and k, measured with the trainer's saved-tensor meter; the
    paper's model has no rotary embeddings. Not counted (small or device-specific): the rotary cos/sin tables
    (2·s·d fp32 per block, whatever b), a copy of q that the grouped QKV layout makes for grouped-query
    attention without rotary positions (a·d; no configured model has it), and the per-row log-sum-exp of the
    fused attention. The attention scores (5as/h) count query heads, a·s² per head, with any k.
    """
    h, k, a, f = shape.n_embd, shape.kv_heads, shape.n_head, shape.ffn_size
    rope = 2 * (1 + k / a) if shape.position == "rope" else 0.0
    mlp = (8 if shape.mlp == "swiglu" else 4) * f / h
    return 2 + 4 * k / a + 2 + rope + mlp


def shape_activation_bytes(
    shape,
    b: int,
    t: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    scores: bool = True,
    recompute: str = "none",
) -> float:
    """Activations one block of a ``ModelShape`` (its s, h, a and ``split_activations``) keeps for backward per
    micro-batch (Korthikanti et al. 2022, Table 2): all of them (``activation_bytes_per_layer``;
    ``scores=False``: a fused attention kernel's, without the s×s scores), all but the attention core's under
    selective recompute, or under full recompute its input alone, 2sbh (/t with SP) at 16 bits, scaled to
    ``precision`` (a fully recomputed run of several blocks keeps only its first one's: ``recomputed_runs``)."""
    s, h, a = shape.seq_len, shape.n_embd, shape.n_head
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1) * BYTES[precision] / 2
    kept_scores, split = scores and recompute == "none", split_activations(shape)
    return activation_bytes_per_layer(s, b, h, a, t, sequence_parallel, precision, kept_scores, split)


def dp_comm_bytes_per_step(psi: float, dp: int, zero_stage: int, grad_bytes: int = 4) -> float:
    """Bytes a rank sends per optimizer step for data parallelism (Rajbhandari et al. 2020, 7.1):
    stages 0-2 move 2Ψ (reduce-scatter + all-gather = one all-reduce), stage 3 moves 3Ψ (an extra
    parameter all-gather in the backward pass)."""
    volume = 3.0 if zero_stage == 3 else 2.0
    return volume * (dp - 1) / dp * psi * grad_bytes if dp > 1 else 0.0


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Bubble time over ideal compute time for 1F1B/GPipe: (p-1)/m (Narayanan et al. 2021)."""
    _check_pipeline(pp, micro_batches)
    return (pp - 1) / micro_batches


def pipeline_idle_fraction(pp: int, micro_batches: int) -> float:
    """The same bubble as a fraction of the whole step's time: (p-1)/(m+p-1)."""
    _check_pipeline(pp, micro_batches)
    return (pp - 1) / (micro_batches + pp - 1)


def _check_pipeline(pp: int, micro_batches: int) -> None:
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"need pp >= 1 and micro_batches >= 1, got pp={pp}, micro_batches={micro_batches}")


# --- DeepSpeed's ZeRO as implemented ----------------------------------------------------------


def zero2_gradient_elements(groups: list[list[int]], dp: int, dp_rank: int, align: int = 2) -> int:
    """Gradient elements DeepSpeed's ZeRO-2 holds on one data-parallel rank between micro-batches.

    The paper's 4Ψ/Nd assumes a rank keeps exactly its 1/Nd slice. DeepSpeed flattens each parameter
    group (``groups``: the parameters' sizes in order), pads it to a multiple of align·Nd, cuts it into
    Nd equal partitions, and accumulates the whole gradient of every parameter that overlaps this rank's
    partition -- a parameter cut by a partition boundary is held whole on both sides. For a model whose
    largest tensor (the embedding) spans partitions this is well above 4Ψ/Nd.
    """
    total = 0
    for sizes in groups:
        padded = -(-sum(sizes) // (align * dp)) * align * dp
        part = padded // dp
        lo, hi = dp_rank * part, (dp_rank + 1) * part
        start = 0
        for n in sizes:
            if start < hi and start + n > lo:
                total += n
            start += n
    return total


# --- communication, counted as the implementation issues it ------------------------------------

# Bytes one rank sends on a ring of n, per byte of the collective's full buffer (nccl-tests' "size").
_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "reduce": 1.0, "broadcast": 1.0}


def wire_bytes(kind: str, full_bytes: float, n: int) -> float:
    """Bytes one rank sends for a collective over ``full_bytes`` on ``n`` ranks: (n-1)/n per byte for
    an all-gather, reduce-scatter, reduce or broadcast (on average over the ranks), twice that for an
    all-reduce; a point-to-point send moves its message once, a receive sends nothing."""
    if kind in ("send", "recv"):
        return full_bytes if kind == "send" else 0.0
    if kind not in _RING_FACTOR:
        raise ValueError(f"unknown collective {kind!r}")
    return _RING_FACTOR[kind] * (n - 1) / n * full_bytes if n > 1 else 0.0


def link_bytes(kind: str, full_bytes: float, n: int) -> tuple[float, float]:
    """(sent, received) by one rank for a collective over ``full_bytes`` on ``n`` ranks: a ring sends and
    receives alike; a point-to-point message is sent by one rank and received by the other."""
    if kind == "recv":
        return 0.0, full_bytes
    sent = wire_bytes(kind, full_bytes, n)
    return sent, sent if kind != "send" else 0.0


# --- data-parallel synchronisation schemes (parallel.dp_sync) ------------------------------------


@dataclass(frozen=True)
class SyncTraffic:
    """Bytes one data-parallel synchronisation scheme moves per optimizer step."""

    rank: float  # what a rank sends (a worker, under a parameter server)
    busiest_link: float  # the most that one rank's link carries in one direction


def dp_sync_traffic(scheme: str, psi_bytes: float, n: int, syncs_per_step: float = 1.0) -> SyncTraffic:
    """Traffic of keeping ``n`` data-parallel replicas of ``psi_bytes`` (Ψ: fp32 gradients or parameters) in step:

    allreduce          a ring all-reduce of the gradients: 2(N-1)/N·Ψ per rank, every link alike
    parameter_server   every worker sends Ψ of gradients to the server and receives Ψ of their mean; the
                       server is dp rank 0, a worker too, so its link carries (N-1)·Ψ each way (a server
                       that is not a worker would carry N·Ψ)
    local_sgd          a ring all-reduce of Ψ parameters on ``syncs_per_step`` of the steps (1/H)
    """
    if n <= 1:
        return SyncTraffic(0.0, 0.0)
    ring = wire_bytes("all_reduce", psi_bytes, n)
    if scheme == "allreduce":
        return SyncTraffic(ring, ring)
    if scheme == "parameter_server":
        return SyncTraffic(psi_bytes, (n - 1) * psi_bytes)
    if scheme == "local_sgd":
        return SyncTraffic(ring * syncs_per_step, ring * syncs_per_step)
    raise ValueError(f"unknown data-parallel synchronisation {scheme!r}")


def is_sync_step(step: int, interval: int, steps: int) -> bool:
    """Whether 1-based optimizer ``step`` of ``steps`` averages the replicas under local SGD: every
    ``interval``-th, and the last, so the run ends on one model."""
    return step % interval == 0 or step == steps


def zero3_gathered(psi: float, live: float) -> float:
    """Parameters ZeRO-3 all-gathers per micro-batch on a rank whose shard is ``psi``: the whole shard for the
    forward, and for the backward all but about ``live`` of them, which stay gathered (DeepSpeed releases a
    parameter after use unless it is needed again within ``stage3_max_reuse_distance``, and keeps at most
    ``stage3_max_live_parameters``; the trainer sets both to ``ZERO3_MAX_LIVE_PARAMETERS``). Full recomputation
    re-gathers little more: each block's second forward runs just before its backward. Measured at dp 2 with
    live = 1e7 (trainer's per-step collective records): a 29.4M-parameter shard gathers 1.67x its size per
    micro-batch (this gives 1.66x), 1.72x with full recompute; gpt-tiny (7.3M) once."""
    return psi + max(0.0, psi - live)


def zero_collectives(psi: float, dp: int, zero_stage: int, micro_batches: int, grad_bytes: int = 4) -> dict:
    """Full-buffer bytes per optimizer step of each collective kind DeepSpeed (0.19) issues over the
    data-parallel group for ZeRO stage 0-3, with this project's DeepSpeed config (one bucket per step
    for these model sizes, ``overlap_comm`` off). Ψ = ``psi`` parameters of this rank's shard.

        stage 0   all-reduce of the gradients, once at the accumulation boundary
        stage 1   the same all-reduce (DeepSpeed reduces ZeRO-1/2 buckets with an all-reduce by default,
                  ``use_multi_rank_bucket_allreduce``), then an all-gather of the updated parameters
        stage 2   the all-reduce in every micro-batch's backward (gradients are partitioned as they
                  are produced), then the all-gather of the parameters
        stage 3   a reduce-scatter of the gradients per micro-batch, and the parameters all-gathered
                  for every micro-batch's forward and, beyond what stays live, its backward
                  (``zero3_gathered``)

    The paper's count (``dp_comm_bytes_per_step``) assumes a reduce-scatter where DeepSpeed
    all-reduces, one micro-batch, and a second gather in backward for stage 3.
    """
    if dp <= 1:
        return {}
    full = psi * grad_bytes
    if zero_stage == 0:
        return {"all_reduce": full}
    if zero_stage == 1:
        return {"all_reduce": full, "all_gather": full}
    if zero_stage == 2:
        return {"all_reduce": micro_batches * full, "all_gather": full}
    gathered = zero3_gathered(psi, ZERO3_MAX_LIVE_PARAMETERS) * grad_bytes
    return {"reduce_scatter": micro_batches * full, "all_gather": micro_batches * gathered}


def tp_collectives(
    l: int,
    b: int,
    s: int,
    h: int,
    t: int,
    sequence_parallel: bool = False,
    act_bytes: int = 4,
    positions: range | None = None,
    replicated: tuple[int, int] = (6, 2),
    recompute_runs: Sequence[int] = (),
    early_stop: bool = False,
) -> dict[str, tuple[int, float]]:
    """(count, full-buffer bytes) per kind of the tensor-parallel collectives of one micro-batch
    (forward and backward) on a rank holding pipeline ``positions`` (default: the whole model).

    Without sequence parallelism: 4 all-reduces of b·s·h per block (2 forward after the row-parallel
    layers, 2 backward before the column-parallel ones), one in the vocab-parallel embedding's
    forward, one for the head's input gradient, and 3 of b·s in the vocab-parallel loss (max,
    target logit, sum of exponentials). With it each block's 4 all-reduces become 4 all-gathers and
    4 reduce-scatters of b·s·h, entering and leaving the block layout add one all-gather each, and
    every backward all-reduces the h-element gradients of the replicated parameters that saw 1/t of
    the tokens (2 per LayerNorm, 1 per row-parallel bias: 6 per block, 2 for the final LayerNorm);
    ``replicated`` gives those counts, (per block, final norm): ``ModelShape.replicated_vectors()``, (2, 1)
    for Llama's RMSNorms without biases. The other collectives' sizes do not depend on the architecture:
    grouped-query attention narrows the column-parallel QKV's output and SwiGLU widens fc1's, not the b·s·h
    inputs and outputs that are reduced or gathered.

    Full recompute (``recompute_runs``: the runs of blocks it re-runs, ``recomputed_runs``) repeats those
    blocks' forward collectives in the backward, 2 per block (2 all-gathers and 2 reduce-scatters with SP);
    with ``early_stop`` (torch's non-reentrant checkpoint, ``recompute_stops_early``) a run's recomputation
    ends once the tensors backward saved are back, before its last collective, whose output none of them is.
    Selective recompute re-runs the attention core alone, which has no collective.
    """
    if t <= 1:
        return {}
    positions = range(l + 3) if positions is None else positions
    blocks = sum(1 for pos in positions if 1 <= pos <= l)
    rerun, skipped = sum(recompute_runs), len(recompute_runs) if early_stop else 0
    bsh, bs = b * s * h * act_bytes, b * s * act_bytes
    first, norm, head = 0 in positions, l + 1 in positions, l + 2 in positions
    reduces = (int(first) + int(head)) * [bsh] + 3 * int(head) * [bs]
    if not sequence_parallel:
        reduces += (4 * blocks + 2 * rerun - skipped) * [bsh]
        return {"all_reduce": (len(reduces), float(sum(reduces)))}
    reduces += (replicated[0] * blocks + replicated[1] * int(norm)) * [h * act_bytes]
    gathers = 4 * blocks + 2 * rerun + int(first) + int(norm)
    scatters = 4 * blocks + 2 * rerun - skipped
    out = {"all_reduce": (len(reduces), float(sum(reduces))), "all_gather": (gathers, float(gathers * bsh))}
    out["reduce_scatter"] = (scatters, float(scatters * bsh))
    return {kind: value for kind, value in out.items() if value[0]}


def recomputed_runs(positions: range, l: int, every: int, pipelined: bool) -> list[int]:
    """Full recompute on a rank holding pipeline ``positions``: the sizes of the runs of blocks it recomputes
    as one (``parallel.activation_checkpoint_interval``: ``every``). The dense GPT cuts its blocks into runs
    of ``every``; a pipeline stage (DeepSpeed's PipelineModule) cuts its positions so from its first and
    recomputes only the runs that are all blocks (trainer.parallel.pipeline)."""
    if pipelined:
        runs = [positions[i : i + every] for i in range(0, len(positions), every)]
        return [len(run) for run in runs if all(1 <= pos <= l for pos in run)]
    blocks = sum(1 for pos in positions if 1 <= pos <= l)
    return [min(every, blocks - start) for start in range(0, blocks, every)]


def recompute_stops_early(pipelined: bool) -> bool:
    """Whether this trainer's full recompute stops short of a run's last collective: the dense GPT recomputes
    with torch's non-reentrant checkpoint, which stops early; a pipeline stage with DeepSpeed's reentrant
    one, which re-runs the whole forward."""
    return not pipelined


def pipeline_p2p_bytes(
    b: int,
    s: int,
    h: int,
    stage: int,
    pp: int,
    micro_batches: int,
    act_bytes: int = 4,
    t: int = 1,
    partitioned: bool = False,
) -> float:
    """Bytes one stage sends per step through the pipeline: every micro-batch's activation to the next
    stage (all but the last) and its gradient back to the previous one (all but the first).

    ``partitioned`` (DeepSpeed's ``pipe_partitioned``/``grad_partitioned``, used at tp > 1 without
    sequence parallelism): each tp rank sends 1/t of the tensor, and the full tensor is all-gathered
    over the tp group where it is needed -- on arrival (activations and gradients) and, on the sending
    stage, to restore its own partitioned output before backward: per micro-batch one gather on the
    first stage for the received gradient plus one for the restore, one on the last stage for the
    received activation, three on a stage in between.
    """
    if pp <= 1:
        return 0.0
    first, last = stage == 0, stage == pp - 1
    message = b * s * h * act_bytes
    sends = int(not last) + int(not first)
    if not partitioned or t <= 1:
        return sends * micro_batches * message
    gathers = 2 * int(not last) + int(not first)
    return micro_batches * (sends * message / t + gathers * wire_bytes("all_gather", message, t))


def head_activation_bytes(
    s: int, b: int, h: int, V: int, t: int = 1, precision: str = "fp32", fused: bool = False
) -> float:
    """Activations the output layer keeps: the final norm's input and output (s·b·h each, the head's
    input) and one (s, b, V/t) tensor of log-probabilities for the cross-entropy backward (fp32). The same
    for a tied and an untied head, a LayerNorm and an RMSNorm. ``fused`` (``speed.fused_loss``): the norm's
    input, the gradients of the head's input (s·b·h) and of its weight (V/t·h), both computed in forward and
    kept until the head's backward, and no logits."""
    if fused:
        return (2 * s * b * h + V / t * h) * BYTES[precision]
    return s * b * (2 * h * BYTES[precision] + V / t * 4)
