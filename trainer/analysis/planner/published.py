"""Measured large-scale runs to check the planner against: Megatron-LM on DGX A100 80GB nodes
(Selene), Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21; arXiv:2104.04473), as we recall them from the paper (docs/planner.md lists them with the
caveat); and three runs on DeepSpeed's pipeline engine, this trainer's (``DEEPSPEED_RUNS``, below). No copy of
the papers is in the project: the places cited are sections, tables and figures; page numbers are not given
because we could not check them.

All use sequence length 2048, vocabulary 51,200, mixed precision, full activation recomputation and no
ZeRO; the TFLOP/s count recomputation (the paper's eq. 3: 96·B·s·l·h²(1 + s/6h + V/16lh)). Table 2
states micro-batch 1 for its PTD-P rows; Table 1 does not state micro-batch sizes.

What the paper leaves out its authors' scripts state: Megatron-LM's repository keeps "the scripts that were used
to produce the results" (examples/academic_paper_scripts/sc21: run_table_1.sh, CONFIG.sh, run_figure_13..15.sh;
Megatron-LM commit 6985e58 named there). From them: every run is fp16 (``--fp16``, without
``--accumulate-allreduce-grads-in-fp32``, so gradients are reduced in fp16); Table 1's micro-batch sizes (16, 16,
16, 8, 4, 2, 2, 1, 1, 1 from 1.7B to 1T); its four pp = 1 rows use torch's DistributedDataParallel, which
reduces the gradients while the last micro-batch's backward runs (``--DDP-impl torch``), the others and the
figures Megatron-LM's local DDP, which reduces after backward; the 76B–530B rows run the interleaved schedule
with 5, 5, 3 and 1 layers per virtual stage, i.e. v = 3, 2, 2 and 3 model chunks per stage (``virtual_stages``:
bubble (p - 1)/(v·m), v times the pipeline sends).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.model.shape import ModelShape

SEQ_LEN, VOCAB = 2048, 51200


@dataclass(frozen=True)
class PublishedRun:
    source: str
    params_b: float  # as printed, billions
    n_layer: int
    hidden: int
    heads: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    tflops_per_gpu: float  # achieved, recompute counted
    micro_batch: int | None = None  # None: not published (Table 1's: its authors' scripts)
    aggregate_pflops: float | None = None  # Table 1's "achieved aggregate petaFLOP/s" column (GPUs x TFLOP/s)
    # The DeepSpeed-engine runs' own facts (the Megatron-LM 2021 rows keep the defaults)
    engine: str = "megatron"
    zero_stage: int = 0
    precision: str = "fp16"
    ddp: str = "local"  # Megatron-LM's --DDP-impl: torch reduces the gradients during the last backward
    virtual_stages: int = 1  # Megatron-LM's interleaved schedule: model chunks per pipeline stage
    vocab: int = VOCAB
    iteration_s: float | None = None  # as published, where it is
    inter_node_bw_gbs: float | None = None  # per GPU, one direction, where the cluster is not a DGX A100's 25
    gpu_gb: int = 80  # A100-SXM4 80GB (DGX A100 80GB) or 40GB: device memory and its bandwidth
    attention: str = "auto"  # cluster.attention: the run's kernel where it is not its engine's
    tie_embeddings: bool = True
    position: str = "learned"

    @property
    def name(self) -> str:
        return f"{self.params_b:g}B on {self.gpus} GPUs ({self.source})"

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def nodes(self) -> int:
        return self.gpus // 8

    def shape(self) -> ModelShape:
        name, arch = f"{self.params_b:g}B", {"tie_embeddings": self.tie_embeddings, "position": self.position}
        return ModelShape(self.n_layer, self.hidden, self.heads, SEQ_LEN, self.vocab, name=name, **arch)

    def cluster(self, dgx_a100):
        """The ClusterConfig the run had: ``dgx_a100`` (one DGX A100 80GB node's file) with the run's nodes,
        engine and network."""
        from dataclasses import replace

        network = {"inter_node_bw_gbs": self.inter_node_bw_gbs} if self.inter_node_bw_gbs else {}
        # conf/cluster/a100-40gb.yaml's numbers for the 40GB part
        memory = {"mem_per_gpu_gb": 42.4, "mem_bw_gbs": 1555} if self.gpu_gb == 40 else {}
        overlap = self.ddp == "torch"
        return replace(
            dgx_a100, nodes=self.nodes, engine=self.engine, overlap_grad_reduce=overlap, attention=self.attention,
            **network, **memory,
        )  # fmt: skip


T1, T2 = "Table 1", "Table 2"
MEGATRON_2021 = (
    # Table 1 (Section 5.1, "End-to-End Performance"): weak scaling, PTD-P; aggregate_pflops is its aggregate
    # petaFLOP/s column (the 1T row's 502 is also in the abstract: "502 petaFLOP/s on 3072 GPUs", 52% of peak).
    # Micro-batch, DDP and virtual stages are run_table_1.sh's (the module docstring).
    PublishedRun(T1, 1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, aggregate_pflops=4.4, ddp="torch"),
    PublishedRun(T1, 3.6, 30, 3072, 32, 2, 1, 64, 512, 138, 16, aggregate_pflops=8.8, ddp="torch"),
    PublishedRun(T1, 7.5, 36, 4096, 32, 4, 1, 128, 512, 142, 16, aggregate_pflops=18.2, ddp="torch"),
    PublishedRun(T1, 18.4, 40, 6144, 48, 8, 1, 256, 1024, 135, 8, aggregate_pflops=34.6, ddp="torch"),
    PublishedRun(T1, 39.1, 48, 8192, 64, 8, 2, 512, 1536, 138, 4, aggregate_pflops=70.8),
    PublishedRun(T1, 76.1, 60, 10240, 80, 8, 4, 1024, 1792, 140, 2, aggregate_pflops=143.8, virtual_stages=3),
    PublishedRun(T1, 145.6, 80, 12288, 96, 8, 8, 1536, 2304, 148, 2, aggregate_pflops=227.1, virtual_stages=2),
    PublishedRun(T1, 310.1, 96, 16384, 128, 8, 16, 1920, 2160, 155, 1, aggregate_pflops=297.4, virtual_stages=2),
    PublishedRun(T1, 529.6, 105, 20480, 128, 8, 35, 2520, 2520, 163, 1, aggregate_pflops=410.2, virtual_stages=3),
    PublishedRun(T1, 1008.0, 128, 25600, 160, 8, 64, 3072, 3072, 163, 1, aggregate_pflops=502.0),
    # Table 2: PTD-P rows (model-parallel size 96 = tp8 x pp12 for GPT-3 175B, 280 = tp8 x pp35), micro-batch 1
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 384, 1536, 153, 1),
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 768, 1536, 149, 1),
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 1536, 1536, 141, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 560, 2240, 171, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 1120, 2240, 167, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 2240, 2240, 159, 1),
)

# Runs on DeepSpeed's pipeline engine with Megatron-style tensor parallelism (Megatron-DeepSpeed), as we recall
# them; TFLOP/s count the full recomputation's forward (eq. 3, which both logged). The planner predicts them as
# this trainer's engine (cluster.engine deepspeed), whose slots run at the cluster's pipeline_efficiency:
#   * MT-NLG 530B, Smith et al. 2022 ("Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B",
#     arXiv:2201.11990), Section 3 (the system-performance table: nodes, iteration time, TFLOP/s per GPU): DGX A100
#     80GB nodes on HDR InfiniBand (Selene), tp 8 x pp 35, batch 1920, micro-batch 1, mixed precision (fp16),
#     recomputation. ZeRO's stage is not stated as we recall; ZeRO-1 is assumed (ZeRO-0 predicts 0.1 % slower).
#     The same model and layout as Table 2's 530B rows of Megatron-LM 2021, whose engine ran a slot ~1.18x faster.
#     conf/cluster/a100-80gb.yaml's pipeline_efficiency is fitted on the 350-node row; the others are checks.
#   * BLOOM 176B, BigScience 2022 (Le Scao et al., arXiv:2211.05100, Section 3.4; the model card and the training
#     summary: "about 150 TFLOPs"): 48 nodes of 8 A100 80GB on Jean Zay, 4 x 100 Gb/s Omni-Path per node (6.25 GB/s
#     per GPU), tp 4 x pp 12 x dp 8, batch 2048, micro-batch 2, bf16 with ZeRO-1-style sharding (DeepSpeed's
#     BF16_Optimizer; it accumulates and reduces gradients in fp32, which this trainer does not), full
#     recomputation; 70 layers over 12 stages (uneven for Megatron-LM), vocabulary 250,680. Out of sample.
#   * GPT-NeoX-20B, Black et al. 2022 ("GPT-NeoX-20B: An Open-Source Autoregressive Language Model",
#     arXiv:2204.06745, Section 3 ("117 teraFLOPS per GPU") and its training config, configs/20B.yml in
#     EleutherAI/gpt-neox): 12 nodes of 8 A100-SXM4-40GB (HGX board, NVSwitch) with four 200 Gb/s HDR HCAs per node
#     (12.5 GB/s per GPU), tp 2 x pp 4 x dp 12, micro-batch 4 x 32 accumulation = 1536 sequences (the paper writes
#     1538), fp16, ZeRO-1, full recomputation, 44 layers, h 6144, 64 heads, vocabulary 50,432, untied head,
#     rotary positions. Out of sample.
# None of them had flash attention: Megatron's softmax kernel between two batched matmuls, the s×s scores in
# memory (attention "materialized"), where this trainer's engine runs fused kernels.
MTNLG, BLOOM, NEOX = "MT-NLG", "BLOOM", "GPT-NeoX"
_DEEPSPEED = {"engine": "deepspeed", "zero_stage": 1, "attention": "materialized"}
# fmt: off
DEEPSPEED_RUNS = (
    *(
        PublishedRun(MTNLG, 530, 105, 20480, 128, 8, 35, gpus, 1920, tflops, micro_batch=1, precision="fp16",
                     iteration_s=seconds, **_DEEPSPEED)
        for gpus, seconds, tflops in ((2240, 60.1, 126), (2800, 50.2, 121), (3360, 44.4, 113))
    ),
    PublishedRun(BLOOM, 176, 70, 14336, 112, 4, 12, 384, 2048, 150, micro_batch=2, precision="bf16", vocab=250680,
                 inter_node_bw_gbs=6.25, **_DEEPSPEED),
    PublishedRun(NEOX, 20.6, 44, 6144, 64, 2, 4, 96, 1536, 117, micro_batch=4, precision="fp16", vocab=50432,
                 inter_node_bw_gbs=12.5, gpu_gb=40, tie_embeddings=False, position="rope", **_DEEPSPEED),
)
# fmt: on
FITTED_RUN = DEEPSPEED_RUNS[1]  # MT-NLG on 350 nodes: what pipeline_efficiency is fitted on


# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198), its
# abstract: Table 2's 530B model on 2240 A100 GPUs reaches 54.2% MFU with sequence parallelism and selective
# recomputation, 42.1% with full recomputation (Megatron-LM's engine, a year on from Narayanan et al.). The abstract
# states neither layout nor batch; both are taken as Table 2's row on the same GPUs (tp 8 x pp 35 x dp 8,
# micro-batch 1, batch 2240), which we recall the paper's end-to-end runs share. Out of sample: nothing was
# fitted to it, and it is the only published check of the planner's selective recompute and sequence parallelism.


@dataclass(frozen=True)
class PublishedMFU:
    run: PublishedRun  # the model, layout, GPUs and batch
    recompute: str
    sequence_parallel: bool
    mfu: float  # model FLOPs (recompute not counted) over the GPUs' peak


KORTHIKANTI_2022 = tuple(
    PublishedMFU(next(r for r in MEGATRON_2021 if r.source == T2 and r.params_b == 529.6 and r.gpus == 2240), *row)
    for row in (("full", False, 0.421), ("selective", True, 0.542))
)


# Section 5.1's estimate for GPT-3 175B on 1024 GPUs at batch 1536 (the issue's example): 140 TFLOP/s
# per GPU, 34 days for 300B tokens. A derived figure with no layout given.
GPT3_1024_TFLOPS = 140.0


@dataclass(frozen=True)
class TrainingTimeEstimate:
    """Section 5.1's end-to-end estimates by its eq. (4), time ≈ 8·T·P / (n·X): T tokens, P parameters, n GPUs,
    X TFLOP/s per GPU (8 = 6 FLOPs per parameter and token, plus 2 for the full recomputation's forward)."""

    params: float
    tokens: float
    gpus: int
    tflops_per_gpu: float
    days: float  # as the paper states it


TRAINING_TIME_ESTIMATES = (
    TrainingTimeEstimate(175e9, 300e9, 1024, 140, 34),  # GPT-3: "about 34 days"
    TrainingTimeEstimate(1e12, 450e9, 3072, 163, 84),  # the 1T model: "about 84 days"
)


# --- the paper's sweeps of parallel configurations (Section 5.4, "Comparison of Parallel Configurations") ------
#
# Each figure plots achieved TFLOP/s per GPU of five configurations of 64 A100 GPUs at a few global batch sizes.
# What we hold is the ordering the paper reports, not the bar heights (we do not trust our recollection of those):
# ``order`` is best first as the figure shows it; ``unimodal`` says the figure falls off on both sides of its best
# configuration along the x-axis (Figure 13), otherwise the order is total. The model configurations are not given
# in the captions as we recall them; the shapes below are the GPT shapes of the stated sizes with 32 layers
# (162.2B: h = 20480, a = 128 gives 162.16B; 5.9B: h = 3840, a = 32 gives 5.87B), which the authors' scripts
# (run_figure_13..15.sh) confirm. All runs are Megatron-LM 2021's space: no ZeRO, full recomputation, no sequence
# parallelism; the scripts add micro-batch 1, fp16 and local DDP (the reduction after backward).


@dataclass(frozen=True)
class PublishedSweep:
    figure: str
    section: str
    shape: ModelShape
    axes: tuple[str, str]  # which degrees the pairs give, e.g. ("pp", "tp"); the third is 1 or what is left
    pairs: tuple[tuple[int, int], ...]  # along the figure's x-axis
    batches: tuple[int, ...]
    best: tuple[int, int]  # the paper's best pair at every batch size
    shape_of_curve: str  # "unimodal": falls off on both sides of ``best`` along the x-axis; "monotone": in x order
    gpus: int = 64
    micro_batch: int = 1  # the scripts'

    def degrees(self, pair: tuple[int, int]) -> tuple[int, int, int]:
        """(tp, pp, dp) of a pair; the degree not on the axes fills the GPUs."""
        given = dict(zip(self.axes, pair))
        rest = self.gpus // (given.get("tp", 1) * given.get("pp", 1) * given.get("dp", 1))
        missing = ({"tp", "pp", "dp"} - set(self.axes)).pop()
        given[missing] = rest
        return given["tp"], given["pp"], given["dp"]


SHAPE_162B = ModelShape(32, 20480, 128, SEQ_LEN, VOCAB, name="162.2B")
SHAPE_5_9B = ModelShape(32, 3840, 32, SEQ_LEN, VOCAB, name="5.9B")
_PAIRS = ((2, 32), (4, 16), (8, 8), (16, 4), (32, 2))
SWEEPS = (
    # Figure 13 (Section 5.4.1, tensor versus pipeline parallelism): x = (pipeline, tensor) sizes, batch 32 and 128
    # (as we recall); (8, 8) is best at both, falling off on either side: more tensor parallelism crosses nodes, more
    # pipeline parallelism adds bubble.
    PublishedSweep("Figure 13", "5.4.1", SHAPE_162B, ("pp", "tp"), _PAIRS, (32, 128), (8, 8), "unimodal"),
    # Figure 14 (Section 5.4.2, pipeline versus data parallelism, tensor size 1): x = (pipeline, data) sizes; the
    # throughput falls as the pipeline grows, at every batch size shown (32, 128, 512 as we recall).
    PublishedSweep("Figure 14", "5.4.2", SHAPE_5_9B, ("pp", "dp"), _PAIRS, (32, 128, 512), (2, 32), "monotone"),
    # Figure 15 (Section 5.4.3, tensor versus data parallelism, pipeline size 1): x = (tensor, data) sizes; the
    # throughput falls as tensor parallelism grows (it crosses nodes at 16 and 32), at every batch size shown.
    PublishedSweep("Figure 15", "5.4.3", SHAPE_5_9B, ("tp", "dp"), _PAIRS, (32, 128, 512), (2, 32), "monotone"),
)


# Figure 12 (Section 5.3.2, interleaved versus non-interleaved schedule): GPT-3 175B on 96 GPUs, tp 8 x pp 12,
# micro-batch 1, batch 12 to 60 (run_figure_12.sh: 96 layers, h 12288, 96 heads, 2 layers per virtual stage, so
# v = 4 chunks of the 8 layers a stage holds). The paper: the interleaved schedule (with the scatter/gather
# optimisation) is faster at every batch size, and the gap closes as the batch grows (the default schedule's
# bubble shrinks, and the interleaved one sends more per sample).
INTERLEAVED_SWEEP = {"shape": ModelShape(96, 12288, 96, SEQ_LEN, VOCAB, name="174.6B"), "tp": 8, "pp": 12,
                     "virtual_stages": 4, "batches": (12, 24, 36, 48, 60)}  # fmt: skip


def interleaving_point(batch: int, virtual_stages: int, cluster):
    """The planner's prediction of Figure 12's configuration at ``batch`` with ``virtual_stages`` chunks per
    stage (1: the default schedule); ``cluster``: a ClusterConfig of DGX A100 nodes."""
    from dataclasses import replace

    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.layouts import Layout
    from trainer.analysis.planner.predict import predict

    sweep = INTERLEAVED_SWEEP
    tp, pp = sweep["tp"], sweep["pp"]
    spec = cluster_spec(replace(cluster, nodes=tp * pp // cluster.gpus_per_node, engine="megatron"))
    layout = Layout(tp, pp, 1, 0, 1, "full", False, virtual_stages)
    return predict(sweep["shape"], layout, batch, "fp16", spec)


def sweep_point(sweep: PublishedSweep, pair: tuple[int, int], batch: int, cluster):
    """The planner's prediction for one configuration of a sweep as the scripts ran it (Megatron-LM 2021's option
    space, the sweep's micro-batch, fp16, local DDP), or None when it does not fit. ``cluster``: a ClusterConfig
    of DGX A100 nodes."""
    from dataclasses import replace

    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.layouts import Layout
    from trainer.analysis.planner.predict import predict

    tp, pp, dp = sweep.degrees(pair)
    spec = cluster_spec(replace(cluster, nodes=sweep.gpus // cluster.gpus_per_node, engine="megatron"))
    layout = Layout(tp, pp, dp, 0, sweep.micro_batch, "full", False)
    q = predict(sweep.shape, layout, batch, "fp16", spec)
    return q if q.fits else None


@dataclass(frozen=True)
class Check:
    """How the planner does on one published run, inside Megatron-LM 2021's own option space."""

    run: PublishedRun
    predicted_tflops: float | None  # the published layout's prediction, recompute counted; None: not feasible
    rank: int | None  # among Megatron-2021 layouts (tp, pp, dp, micro-batch; ZeRO-0, full recompute, no SP)
    candidates: int  # how many such layouts fit
    gap: float | None  # 1 - published layout's tokens/s / the best such layout's

    @property
    def error(self) -> float | None:
        return None if self.predicted_tflops is None else self.predicted_tflops / self.run.tflops_per_gpu - 1


def megatron_2021(p) -> bool:
    """What the paper's system could do: no ZeRO, full activation recomputation, no sequence parallelism."""
    return p.layout.zero_stage == 0 and p.layout.recompute == "full" and not p.layout.sequence_parallel


def check(run: PublishedRun, cluster) -> Check:
    """``cluster``: a ClusterConfig for one DGX A100 node; the run's node count is set here."""
    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.predict import make_plan

    spec = cluster_spec(run.cluster(cluster))
    plan = make_plan(run.shape(), spec, run.global_batch, run.precision, virtual_stages=run.virtual_stages)
    space = [p for p in plan.ranked if megatron_2021(p)]
    degrees = (run.tp, run.pp, run.dp, run.virtual_stages)
    published = [
        p
        for p in space
        if (p.layout.tp, p.layout.pp, p.layout.dp, p.layout.virtual_stages) == degrees
        and run.micro_batch in (None, p.layout.micro_batch)
    ]
    if not published:
        return Check(run, None, None, len(space), None)
    best = published[0]  # the fastest micro-batch where the paper does not say
    return Check(
        run, best.hw_tflops_per_gpu, space.index(best) + 1, len(space), 1 - best.tokens_per_s / space[0].tokens_per_s
    )


def predict_published(run: PublishedRun, cluster):
    """The planner's prediction of ``run``'s published layout (micro-batch and ZeRO stage as published, full
    recomputation) on the run's cluster; ``cluster``: one DGX A100 80GB node's ClusterConfig."""
    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.layouts import Layout
    from trainer.analysis.planner.predict import predict

    layout = Layout(run.tp, run.pp, run.dp, run.zero_stage, run.micro_batch, "full", False, run.virtual_stages)
    return predict(run.shape(), layout, run.global_batch, run.precision, cluster_spec(run.cluster(cluster)))


def fitted_pipeline_efficiency(run: PublishedRun, cluster) -> float:
    """The pipeline_efficiency at which the prediction of ``run`` equals its published TFLOP/s: the modelled
    slots' time over the time the published rate leaves for them (the step less the gradient reduction and
    the optimizer step, which run outside the slots)."""
    from dataclasses import replace

    q = predict_published(run, replace(cluster, pipeline_efficiency=1.0))
    published_step = q.time.total * q.hw_tflops_per_gpu / run.tflops_per_gpu  # same FLOPs at the published rate
    outside = q.time.dp_comm + q.time.optimizer
    return (q.time.total - outside) / (published_step - outside)
