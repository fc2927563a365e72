"""The DeepSpeed configuration, derived from the composed config (its single source of truth)."""

from __future__ import annotations

from typing import Any

from trainer.config.schema import BatchPlan, Config


def ds_config(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """Pure function: (config, batch plan) -> the dict given to ``deepspeed.initialize``."""
    o, p = cfg.optim, cfg.parallel
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # DeepSpeed's fused CPU/GPU Adam needs a compiled op; torch's AdamW runs everywhere.
                "torch_adam": True,
            },
        },
        # The learning-rate schedule is trainer.training.schedule.lr_at, handed to deepspeed.initialize.
        "zero_optimization": _zero(p.zero_stage),
        "bf16": {"enabled": p.precision == "bf16"},
        # Dynamic loss scaling from 2^16; hysteresis 1: every overflow halves the scale at once, as DeepSpeed's
        # unfused fp16 optimizer (ZeRO-0) always does, so ZeRO's optimizers (default 2) behave the same.
        "fp16": {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1},
    }


# ZeRO buffer sizes in elements; trainer.analysis.planner.memory sizes its buffers from the same numbers.
# 1e7 (40 MB in fp32) keeps buckets a small fraction of a rank's share for models that fill a device
# (gpt2-large at ZeRO-3 on 4 CPU ranks needs it) and is still large enough to amortise a collective's
# latency (Megatron-Core's gradient buckets are 4e7 elements).
ZERO_BUCKET_ELEMENTS = int(1e7)
# ZeRO-3 keeps at most this many gathered parameters alive (and re-uses them within this distance)
# instead of DeepSpeed's default 1e9, which lets every rank hold the whole gathered model of up to 1B
# parameters: with the bucket size, a rank's gathered weights stay within a bucket's worth.
ZERO3_MAX_LIVE_PARAMETERS = ZERO_BUCKET_ELEMENTS
# ZeRO-3 steps its optimizer over sub-groups of this many elements of a rank's partition (DeepSpeed's
# default, 1e9, steps the whole partition at once, and AdamW's temporaries are the size of what it steps).
ZERO3_SUB_GROUP_ELEMENTS = ZERO_BUCKET_ELEMENTS


def _zero(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Fixed bucket sizes keep communication patterns comparable across model sizes.
        zero.update(
            reduce_bucket_size=ZERO_BUCKET_ELEMENTS, allgather_bucket_size=ZERO_BUCKET_ELEMENTS, overlap_comm=False
        )
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0,
            stage3_prefetch_bucket_size=ZERO_BUCKET_ELEMENTS,
            stage3_max_live_parameters=ZERO3_MAX_LIVE_PARAMETERS,
            stage3_max_reuse_distance=ZERO3_MAX_LIVE_PARAMETERS,
            sub_group_size=ZERO3_SUB_GROUP_ELEMENTS,
        )
    return zero
