"""Step time of a layout, term by term (seconds per optimizer step, per GPU).

    step = (m + (p - 1)/v) · t_micro / e_pipe + t_dp + t_optimizer  (1F1B: bubble (p-1)/(v·m) of the ideal time;
           v = 1 but for Megatron-LM's interleaved schedule, whose v chunks per stage also send v times as often)
    t_micro = compute + tp collectives + pipeline p2p + ZeRO-2/3 per-micro-batch traffic
    e_pipe = the cluster's pipeline_efficiency for pp > 1 (1 for Megatron-LM 2021's engine, whose Table 2 the
             model meets; DeepSpeed's PipelineEngine runs the same slots slower: docs/planner.md), 1 for pp = 1

Compute: the slowest stage's executed FLOPs over peak × compute_efficiency (the matmuls), plus its
memory-bound traffic over memory bandwidth (elementwise_bytes: small hidden sizes lose most to it). A block's forward is
2bsW + 4bs²h FLOPs, W = ``ModelShape.block_weights()`` the elements of its weight matrices (12h² for GPT:
24bsh² + 4bs²h; (a+2k)·d·h + h² + 3fh with grouped-query attention and SwiGLU; the attention core counts query
heads, so k does not enter it); training runs it 3 times (forward + backward), 4 with full recompute, and
selective recompute adds the attention core's 4bs²h; the head adds 6bshV on the last stage, tied or not. Summed
over stages this is ``formulas.flops_per_token``, for GPT Narayanan et al. 2021's 72·B·s·l·h²(1 + s/6h +
V/12lh) (96 and V/16lh with full recompute). Collectives are ring collectives (time = ring bytes / bandwidth
+ steps × latency):
  * tp: 4 all-reduces of b·s·h per block and micro-batch (2 forward, 2 backward), and the forward's again
    under full recompute (``formulas.tp_collectives``'s count; the embedding's, head's and loss's calls add
    their fixed cost only); SP's all-gather + reduce-scatter pairs move the same bytes. Over NVLink, not
    overlapped.
    The same for GQA and SwiGLU: their column-parallel layers' outputs change width, not the b·s·h reduced.
  * pp: each micro-batch sends its activation forward and its gradient back, b·s·h/t per GPU
    (Megatron's scatter/gather: each tp rank sends its slice), across nodes when there are several.
  * dp: after the last micro-batch (DeepSpeed reduces at the accumulation boundary; the planner assumes
    overlap_comm off, so nothing is overlapped), or with ``cluster.overlap_grad_reduce`` (Megatron-LM's torch
    DDP) during the last micro-batch's backward, costing what outlasts it. ZeRO-0 all-reduces the gradients,
    ZeRO-1 reduces them and all-gathers the 16-bit weights, ZeRO-2 reduces every micro-batch and all-gathers
    the weights once, ZeRO-3 all-gathers the weights for every forward, and for its backward all but what stays live
    (``formulas.zero3_gathered``), and reduce-scatters every micro-batch. ZeRO-1/2's reduction is an
    all-reduce in DeepSpeed, a reduce-scatter for Megatron-LM (``stages.zero_gradient_reduction``);
    DeepSpeed's bf16 pipeline at ZeRO-0 also all-gathers (``stages.shards_optimizer``: its BF16_Optimizer
    shards like ZeRO-1).
  * optimizer: Adam reads and writes ~30 bytes per parameter it updates (fp32 master, m, v, gradient,
    16-bit weight), bound by memory bandwidth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from trainer.analysis.formulas import (
    BYTES,
    dp_sync_traffic,
    recompute_stops_early,
    shape_activation_bytes,
    tp_collectives,
    wire_bytes,
    zero3_gathered,
)
from trainer.analysis.planner.cluster import ClusterSpec, Link
from trainer.analysis.planner.layouts import Layout
from trainer.analysis.planner.stages import (
    Stage,
    even_stage,
    partition_method,
    pipeline_stages,
    shards_optimizer,
    zero_gradient_reduction,
)
from trainer.model.shape import ModelShape
from trainer.runtime.ds_config import ZERO3_MAX_LIVE_PARAMETERS

FP32_GRAD_PRECISIONS = ("bf16", "fp32")  # Megatron-LM 2021 accumulates and reduces these gradients in fp32
ADAM_BYTES_PER_PARAM = 30


@dataclass(frozen=True)
class StepTime:
    compute: float  # whole step, seconds
    tp_comm: float
    pp_comm: float
    zero_comm: float  # per-micro-batch ZeRO-2/3 traffic, whole step
    dp_comm: float  # end-of-step gradient / weight traffic
    optimizer: float
    bubble: float  # (p-1)/m
    total: float
    engine: float = 0.0  # the pipeline engine's time beyond the modelled slots (pipeline_efficiency < 1)


def ring_time(message_bytes: float, n: int, kind: str, link: Link, call_latency: float = 0.0) -> float:
    """One ring collective: its bytes over the link, its steps' latency, and the fixed per-call cost."""
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return wire_bytes(kind, message_bytes, n) / link.bandwidth + steps * link.latency + call_latency


def dp_sync_time(
    scheme: str, psi_bytes: float, n: int, syncs_per_step: float, link: Link, call_latency: float = 0.0
) -> float:
    """Seconds per optimizer step that a data-parallel synchronisation scheme (``parallel.dp_sync``) spends
    on ``link``: its busiest link's bytes (``dp_sync_traffic``) over the bandwidth, plus latency -- a ring's
    2(N-1) steps, or the server's 2(N-1) messages one after the other -- on ``syncs_per_step`` of the steps."""
    if n <= 1:
        return 0.0
    traffic = dp_sync_traffic(scheme, psi_bytes, n, syncs_per_step)
    rounds = syncs_per_step if scheme == "local_sgd" else 1.0
    calls = 2 * (n - 1) if scheme == "parameter_server" else 1
    return traffic.busiest_link / link.bandwidth + rounds * (2 * (n - 1) * link.latency + calls * call_latency)


def block_flops(shape: ModelShape, layout: Layout) -> float:
    """Executed FLOPs of one block for one micro-batch (forward, backward and any recompute): the forward's
    2bsW for the weight matrices (W = 12h² for GPT) and 4bs²h for QKᵀ and the attention-weighted V."""
    b, s, h = layout.micro_batch, shape.seq_len, shape.n_embd
    forward = 2 * b * s * shape.block_weights() + 4 * b * s * s * h
    extra = {"none": 0.0, "selective": 4 * b * s * s * h, "full": forward}[layout.recompute]
    return 3 * forward + extra


def head_flops(shape: ModelShape, layout: Layout) -> float:
    return 6 * layout.micro_batch * shape.seq_len * shape.n_embd * shape.padded_vocab(layout.tp)


def elementwise_bytes(
    shape: ModelShape,
    layout: Layout,
    precision: str,
    last: bool = True,
    blocks: int | None = None,
    scores: bool = True,
) -> float:
    """Memory traffic of the last stage's memory-bound work (the norms, GeLU or SiLU and the gating product,
    softmax, dropout, the loss) for one micro-batch. Each op reads its input and writes its output, which
    Korthikanti et al. count as the activations a block stores, A (``formulas.shape_activation_bytes``: wider
    for SwiGLU, narrower K and V for GQA): the forward moves 2A; the backward twice that, as with FLOPs; full
    recompute adds a forward, selective the attention core's share of A at t = 1 (5as/h of 34 + 5as/h for GPT).
    ``blocks``: the stage's blocks (default l/p, an even split). ``scores=False``: a fused attention kernel
    (``ClusterSpec.keeps_scores``) keeps the s×s scores on chip, so neither their traffic nor its
    recomputation counts."""
    s, b, h, t = shape.seq_len, layout.micro_batch, shape.n_embd, layout.tp
    block = shape_activation_bytes(shape, b, t, layout.sequence_parallel, precision, scores)
    whole = shape_activation_bytes(shape, b)
    core = (whole - shape_activation_bytes(shape, b, scores=False)) / whole if scores else 0.0
    passes = {"none": 3.0, "selective": 3 + core, "full": 4.0}[layout.recompute]
    head = 4 * s * b * h / t * (1 + shape.padded_vocab(t) / h) * BYTES[precision] / 2 if last else 0.0
    blocks = shape.n_layer // layout.pp if blocks is None else blocks
    return 2 * (passes * blocks * block + 3 * head)


def executed_flops_per_step(shape: ModelShape, layout: Layout, global_batch: int) -> float:
    """All GPUs together: what the hardware executes, recompute included (Megatron's TFLOP/s convention)."""
    micro_batches = global_batch // layout.micro_batch
    return micro_batches * (shape.n_layer * block_flops(shape, layout) + head_flops(shape, layout))


def stage_compute(
    shape: ModelShape, layout: Layout, precision: str, cluster: ClusterSpec, last: bool, stage: Stage | None = None
) -> float:
    """Seconds of one micro-batch's compute on a rank of ``stage`` (default: a middle (``last=False``) or the
    last stage of an even split)."""
    if stage is None:
        middle = Stage(1, range(0), shape.n_layer // layout.pp, False, False)
        stage = even_stage(shape, layout.pp, first=False) if last or layout.pp == 1 else middle
    rate = cluster.rank_peak(precision) * cluster.compute_efficiency
    head = head_flops(shape, layout) if stage.last else 0.0
    flops = stage.blocks * block_flops(shape, layout) + head
    memory = elementwise_bytes(shape, layout, precision, stage.last, stage.blocks, cluster.keeps_scores)
    return flops / layout.tp / rate + memory / cluster.mem_bw


def tp_time(shape: ModelShape, layout: Layout, stage: Stage, precision: str, cluster: ClusterSpec) -> float:
    """Seconds of one micro-batch's tensor-parallel collectives on a rank of ``stage``: its blocks' b·s·h
    collectives as rings over the tp link (an SP all-gather or reduce-scatter is half an all-reduce), and the
    fixed cost of every call ``formulas.tp_collectives`` counts. Full recompute repeats a block's forward
    collectives: all of them in Megatron-LM, this trainer's as ``formulas.recompute_stops_early`` says."""
    if layout.tp <= 1:
        return 0.0
    full, early = layout.recompute == "full", cluster.engine == "deepspeed" and recompute_stops_early(layout.pp > 1)
    b, s, h, t, sp = layout.micro_batch, shape.seq_len, shape.n_embd, layout.tp, layout.sequence_parallel
    one = tp_collectives(1, 1, 1, 1, t, sp, 1, range(1, 2), (0, 0), [1] * full, early)  # one block, no vectors
    per_block = sum(n if kind == "all_reduce" else n / 2 for kind, (n, _) in one.items())
    ring = ring_time(b * s * h * BYTES[precision], t, "all_reduce", cluster.tp_link(t))
    calls = tp_collectives(
        shape.n_layer, b, s, h, t, sp, BYTES[precision], stage.positions, shape.replicated_vectors(),
        [1] * stage.blocks * full, early,
    )  # fmt: skip
    return stage.blocks * per_block * ring + sum(n for n, _ in calls.values()) * cluster.call_latency


def grad_comm_bytes(cluster: ClusterSpec, precision: str) -> int:
    """Bytes per gradient element the data-parallel reductions move: the model's dtype in DeepSpeed (its
    ``communication_data_type`` defaults to it, and the trainer's ds_config sets none) and in Megatron-LM 2021's
    fp16 runs (``--accumulate-allreduce-grads-in-fp32`` is off by default, and its paper's scripts leave it off),
    fp32 under bf16 (which Megatron-LM forces to accumulate and reduce in fp32)."""
    fp32 = cluster.engine == "megatron" and precision in FP32_GRAD_PRECISIONS
    return BYTES["fp32"] if fp32 else BYTES[precision]


def backward_share(layout: Layout) -> float:
    """The backward's share of a micro-batch's compute (with any recompute, which runs inside backward): 2 of
    the 3 forward-sized passes, 3 of 4 under full recompute."""
    return 1 - 1 / {"none": 3.0, "selective": 3.0, "full": 4.0}[layout.recompute]


def step_time(
    shape: ModelShape,
    layout: Layout,
    global_batch: int,
    precision: str,
    cluster: ClusterSpec,
    partition: str | None = None,
) -> StepTime:
    """The step on the busiest stage: every 1F1B slot runs at the pace of the slowest stage's micro-batch, and
    the step ends when the slowest stage has reduced its gradients and stepped. ``partition``: how the stages
    are cut (default: the engine's, ``stages.partition_method``)."""
    m, p, t = layout.micro_batches(global_batch), layout.pp, layout.tp
    method = partition or partition_method(cluster.engine)
    stages = pipeline_stages(shape, t, p, method)
    act = layout.micro_batch * shape.seq_len * shape.n_embd * BYTES[precision]
    link = cluster.pp_link()
    # Interleaving (v virtual stages, Megatron-LM's) sends every micro-batch's activation v times each way
    v = layout.virtual_stages
    pp = 2 * v * (act / t / link.bandwidth + link.latency + cluster.call_latency) if p > 1 else 0.0
    grad_bytes = grad_comm_bytes(cluster, precision)
    per_stage = []
    distinct = {(st.blocks, st.first, st.last): st for st in reversed(stages)}  # equal stages cost the same
    for stage in distinct.values():
        compute = stage_compute(shape, layout, precision, cluster, stage.last, stage)
        tp = tp_time(shape, layout, stage, precision, cluster)
        psi = shape.padded(t).rank_params(t, stage.positions)
        zero = zero_micro_batch_time(layout, psi, precision, cluster, grad_bytes)
        hidden = backward_share(layout) * compute if cluster.overlap_grad_reduce else 0.0  # the last backward
        dp = dp_step_time(layout, psi, precision, cluster, grad_bytes, hidden)
        sharded = shards_optimizer(cluster.engine, precision, p, layout.zero_stage)
        optimizer = (psi / layout.dp if sharded else psi) * ADAM_BYTES_PER_PARAM / cluster.mem_bw
        per_stage.append((compute + tp + pp + zero, compute, tp, zero, dp, optimizer))
    _, compute, tp, zero, _, _ = max(per_stage, key=lambda x: x[0])
    _, _, _, _, dp, optimizer = max(per_stage, key=lambda x: x[4] + x[5])
    slots, bubble = m + (p - 1) / v, (p - 1) / (v * m)  # interleaving divides the bubble by v
    if cluster.pooled and p > 1:
        # Ranks time-share the cores: the bubble fills with other stages' work, so the step takes the
        # machine's whole work (m micro-batches of the mean stage) unless the slowest stage, even at
        # rank_cap times its fair share, is the longer path.
        counts = Counter((st.blocks, st.first, st.last) for st in stages)
        mean = sum(counts[key] * x[1] for key, x in zip(distinct, per_stage)) / p
        if m * mean > slots * compute / cluster.rank_cap:
            slots, compute, bubble = m, mean, 0.0
        else:
            compute /= cluster.rank_cap
    slot = compute + tp + pp + zero
    engine = slots * slot * (1 / cluster.pipeline_efficiency - 1) if p > 1 else 0.0
    total = slots * slot + engine + dp + optimizer
    return StepTime(slots * compute, slots * tp, slots * pp, slots * zero, dp, optimizer, bubble, total, engine)


def zero_micro_batch_time(layout: Layout, psi: float, precision: str, cluster: ClusterSpec, grad_bytes: int) -> float:
    if layout.zero_stage < 2:
        return 0.0
    link, d, call = cluster.dp_link(layout.tp, layout.dp), layout.dp, cluster.call_latency
    if layout.zero_stage == 2:
        return ring_time(psi * grad_bytes, d, zero_gradient_reduction(cluster.engine), link, call)
    reduce = ring_time(psi * grad_bytes, d, "reduce_scatter", link, call)
    gathered = zero3_gathered(psi, ZERO3_MAX_LIVE_PARAMETERS)  # forward, and the backward beyond what stays live
    calls = 1 + (gathered > psi)
    return reduce + calls * ring_time(gathered / calls * BYTES[precision], d, "all_gather", link, call)


def dp_step_time(
    layout: Layout, psi: float, precision: str, cluster: ClusterSpec, grad_bytes: int, hidden: float = 0.0
) -> float:
    """The end-of-step data-parallel traffic of a rank holding ``psi`` parameters; ``hidden``: seconds of the
    gradient reduction that backward hides (the weights' all-gather after the step hides behind nothing)."""
    link, d, call = cluster.dp_link(layout.tp, layout.dp), layout.dp, cluster.call_latency
    gather = ring_time(psi * BYTES[precision], d, "all_gather", link, call)
    if layout.zero_stage == 0:
        reduced = max(0.0, ring_time(psi * grad_bytes, d, "all_reduce", link, call) - hidden)
        return reduced + (gather if shards_optimizer(cluster.engine, precision, layout.pp, 0) else 0.0)
    if layout.zero_stage == 1:
        kind = zero_gradient_reduction(cluster.engine)
        return max(0.0, ring_time(psi * grad_bytes, d, kind, link, call) - hidden) + gather
    return gather if layout.zero_stage == 2 else 0.0
