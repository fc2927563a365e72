"""The pipeline stages of a layout as the engine cuts them, and which engine the planner predicts.

Engines (``cluster.engine``):

* ``deepspeed`` -- this trainer: DeepSpeed's ``PipelineModule`` cuts the n_layer + 3 pipeline positions
  (embedding, blocks, final norm, head) with ``parallel.pipeline_partition``: ``parameters`` (the default;
  balances each stage's parameter count, the embedding and head counting as layers) or ``uniform`` (the same
  number of positions per stage). Any pp <= n_layer runs; stages may differ by blocks. Its gradient
  reductions run in the model's dtype (DeepSpeed's ``communication_data_type`` defaults to it). Attention is
  ``scaled_dot_product_attention``'s fused kernels (flash on GPUs, torch's CPU kernel), which keep no s×s
  scores for backward whatever the recompute setting.
* ``megatron`` -- Megatron-LM 2021 (Narayanan et al.), the engine of the published runs: l/p blocks per stage
  (p must divide l), the embedding on the first, the final norm and head on the last; gradients reduced in
  fp32; its softmax kernel keeps the scores (5as/h of Korthikanti et al.) unless they are recomputed.

The attention kernel is the engine's unless ``cluster.attention`` says otherwise: runs on DeepSpeed's engine
before flash attention (Megatron-DeepSpeed's MT-NLG and BLOOM, GPT-NeoX) computed it as Megatron-LM does.

``trainer.model.shape.ModelShape.stage_bounds`` is the one definition of the cuts (DeepSpeed's algorithms,
checked against DeepSpeed's own ``PipelineModule`` on the trainer's layer specs in
``tests/parallel/test_pipeline_partition.py``); this module turns them into what the cost and memory models
need per stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from trainer.model.shape import PIPELINE_PARTITIONS, ModelShape

ENGINES = ("deepspeed", "megatron")
# cluster.attention: fused = one kernel keeps the s×s scores on chip (flash; this trainer's SDPA); materialized =
# two batched matmuls around a softmax kernel, the scores and probabilities written to memory and kept for
# backward (Megatron-LM's fused scale-mask-softmax); auto = the engine's (deepspeed fused, megatron materialized)
ATTENTIONS = ("auto", "fused", "materialized")


@dataclass(frozen=True)
class Stage:
    index: int  # 0 = first
    positions: range  # pipeline positions: 0 the embedding, 1..l the blocks, l+1 the final norm, l+2 the head
    blocks: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm and the head

    def in_flight(self, pp: int, micro_batches: int) -> int:
        """Micro-batches whose activations this stage holds at once under 1F1B: pp - index, at most m."""
        return min(pp - self.index, micro_batches)


def keeps_attention_scores(engine: str, attention: str = "auto") -> bool:
    """Whether attention writes the s×s scores to memory and keeps them for backward when nothing is recomputed:
    ``attention`` (``ATTENTIONS``) where it is not ``auto``, else the engine's own kernel."""
    if engine not in ENGINES or attention not in ATTENTIONS:
        raise ValueError(f"engine {engine!r}, attention {attention!r}: must be one of {ENGINES}, {ATTENTIONS}")
    return attention == "materialized" or (attention == "auto" and engine == "megatron")


def zero_gradient_reduction(engine: str) -> str:
    """The collective that reduces ZeRO-1/2 gradients: DeepSpeed (0.19) all-reduces each bucket and keeps its
    partition (``use_multi_rank_bucket_allreduce``, its default; ``formulas.zero_collectives``, whose bytes
    ``trainer.compare`` measures exactly), the papers' count and Megatron-LM's distributed optimizer
    reduce-scatter."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: must be one of {ENGINES}")
    return "all_reduce" if engine == "deepspeed" else "reduce_scatter"


def shards_optimizer(engine: str, precision: str, pp: int, zero_stage: int) -> bool:
    """Whether the engine partitions Adam's state over the data-parallel group: ZeRO >= 1, and in DeepSpeed (0.19)
    bf16 under a pipeline at ZeRO-0 too, which it steps with its BF16_Optimizer: fp32 masters and moments in dp
    partitions, a second, flat gradient copy, the gradients all-reduced and the updated weights all-gathered
    (measured by the trainer's per-rank memory and collective records at pp 2 x dp 2)."""
    if zero_stage >= 1:
        return True
    return engine == "deepspeed" and precision == "bf16" and pp > 1


def partition_method(engine: str, partition: str = "parameters") -> str:
    """How ``engine`` cuts the model: Megatron-LM evenly, DeepSpeed by the trainer's ``pipeline_partition``."""
    if engine == "megatron":
        return "even"
    if engine != "deepspeed":
        raise ValueError(f"engine {engine!r}: must be one of {ENGINES}")
    if partition not in PIPELINE_PARTITIONS:
        raise ValueError(f"pipeline_partition {partition!r}: must be one of {PIPELINE_PARTITIONS}")
    return partition


def pipeline_refusal(shape: ModelShape, pp: int, method: str) -> str | None:
    """Why ``pp`` stages cannot run the model under ``method``, or None (DeepSpeed: pp <= n_layer, as the
    trainer's validate() requires; Megatron-LM: pp divides n_layer)."""
    if pp > shape.n_layer:
        return f"more stages than {shape.n_layer} layers"
    if method == "even" and shape.n_layer % pp:
        return f"does not divide {shape.n_layer} layers (Megatron-LM's even stages)"
    return None


@lru_cache(maxsize=8192)
def pipeline_stages(shape: ModelShape, tp: int, pp: int, method: str) -> tuple[Stage, ...]:
    """Every stage of a (tp, pp) layout under ``method`` ("parameters", "uniform" or "even")."""
    l = shape.n_layer
    out = []
    for i, where in enumerate(shape.stages(tp, pp, method)):
        blocks = sum(1 for pos in where if 1 <= pos <= l)
        out.append(Stage(i, where, blocks, 0 in where, l + 2 in where))
    return tuple(out)


def even_stage(shape: ModelShape, pp: int, first: bool) -> Stage:
    """The first or the last stage of Megatron-LM's even split (the planner's model before uneven stages)."""
    l, per = shape.n_layer, shape.n_layer // pp
    if pp == 1:
        return Stage(0, range(0, l + 3), l, True, True)
    if first:
        return Stage(0, range(0, 1 + per), per, True, False)
    return Stage(pp - 1, range(l - per + 1, l + 3), per, False, True)


def memory_candidates(stages: tuple[Stage, ...]) -> list[Stage]:
    """The stages that can need the most memory: the first, the last, and of the middle stages the earliest
    one of each block count (it holds the most micro-batches in flight and the same parameters)."""
    seen, out = set(), []
    for st in stages:
        if st.first or st.last or st.blocks not in seen:
            out.append(st)
            if not (st.first or st.last):
                seen.add(st.blocks)
    return out
