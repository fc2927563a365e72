"""Measured large-scale runs to check the planner against: Megatron-LM on DGX A100 80GB nodes
(Selene), Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21), as we recall them from the paper (docs/planner.md lists them with the caveat).

All use sequence length 2048, vocabulary 51,200, mixed precision, full activation recomputation and no
ZeRO; the TFLOP/s count recomputation (the paper's eq. 3: 96·B·s·l·h²(1 + s/6h + V/16lh)). Table 2
states micro-batch 1 for its PTD-P rows; Table 1 does not state micro-batch sizes.
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
    micro_batch: int | None = None  # None: not published

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
        return ModelShape(self.n_layer, self.hidden, self.heads, SEQ_LEN, VOCAB, name=f"{self.params_b:g}B")


T1, T2 = "Table 1", "Table 2"
MEGATRON_2021 = (
    # Table 1: weak scaling, PTD-P
    PublishedRun(T1, 1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    PublishedRun(T1, 3.6, 30, 3072, 32, 2, 1, 64, 512, 138),
    PublishedRun(T1, 7.5, 36, 4096, 32, 4, 1, 128, 512, 142),
    PublishedRun(T1, 18.4, 40, 6144, 48, 8, 1, 256, 1024, 135),
    PublishedRun(T1, 39.1, 48, 8192, 64, 8, 2, 512, 1536, 138),
    PublishedRun(T1, 76.1, 60, 10240, 80, 8, 4, 1024, 1792, 140),
    PublishedRun(T1, 145.6, 80, 12288, 96, 8, 8, 1536, 2304, 148),
    PublishedRun(T1, 310.1, 96, 16384, 128, 8, 16, 1920, 2160, 155),
    PublishedRun(T1, 529.6, 105, 20480, 128, 8, 35, 2520, 2520, 163),
    PublishedRun(T1, 1008.0, 128, 25600, 160, 8, 64, 3072, 3072, 163),
    # Table 2: PTD-P rows (model-parallel size 96 = tp8 x pp12 for GPT-3 175B, 280 = tp8 x pp35), micro-batch 1
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 384, 1536, 153, 1),
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 768, 1536, 149, 1),
    PublishedRun(T2, 174.6, 96, 12288, 96, 8, 12, 1536, 1536, 141, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 560, 2240, 171, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 1120, 2240, 167, 1),
    PublishedRun(T2, 529.6, 105, 20480, 128, 8, 35, 2240, 2240, 159, 1),
)

# Section 5.1's estimate for GPT-3 175B on 1024 GPUs at batch 1536 (the issue's example): 140 TFLOP/s
# per GPU, 34 days for 300B tokens. A derived figure with no layout given.
GPT3_1024_TFLOPS = 140.0


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
    from dataclasses import replace

    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.predict import make_plan

    spec = cluster_spec(replace(cluster, nodes=run.nodes, engine="megatron"))
    plan = make_plan(run.shape(), spec, run.global_batch, "bf16")
    space = [p for p in plan.ranked if megatron_2021(p)]
    published = [
        p
        for p in space
        if (p.layout.tp, p.layout.pp, p.layout.dp) == (run.tp, run.pp, run.dp)
        and run.micro_batch in (None, p.layout.micro_batch)
    ]
    if not published:
        return Check(run, None, None, len(space), None)
    best = published[0]  # the fastest micro-batch where the paper does not say
    return Check(
        run, best.hw_tflops_per_gpu, space.index(best) + 1, len(space), 1 - best.tokens_per_s / space[0].tokens_per_s
    )
