"""The DeepSpeed configuration, derived from the composed config (its single source of truth)."""

from __future__ import annotations

from typing import Any

from trainer.config.schema import MIXED_PRECISIONS, BatchPlan, Config


def switch_on(value: Any, cuda: bool) -> bool:
    """A ``speed.*`` auto | true | false key (Hydra hands true/false to a str key as "True"/"False"):
    auto is on exactly for CUDA ranks."""
    value = str(value).lower()
    return cuda if value == "auto" else value == "true"


def ds_config(cfg: Config, plan: BatchPlan, cuda: bool = False) -> dict[str, Any]:
    """Pure function: (config, batch plan, whether the ranks are CUDA devices) -> the dict given to
    ``deepspeed.initialize``, ``speed.deepspeed_extra`` merged in last."""
    o, p, speed = cfg.optim, cfg.parallel, cfg.speed
    generated = {
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
                # DeepSpeed's fused CPU/GPU Adam needs a compiled op; torch's AdamW runs everywhere, and
                # DeepSpeed hands it these params: fused=True is torch's single-kernel AdamW.
                "torch_adam": True,
                "fused": switch_on(speed.fused_adamw, cuda),
            },
        },
        # The learning-rate schedule is trainer.training.schedule.lr_at, handed to deepspeed.initialize.
        "zero_optimization": _zero(
            engine_zero_stage(cfg, plan.dp, cuda), switch_on(speed.overlap_comm, cuda), speed.contiguous_gradients
        ),
        "bf16": {"enabled": p.precision == "bf16"},
        # Dynamic loss scaling from 2^16; hysteresis 1: every overflow halves the scale at once, as DeepSpeed's
        # unfused fp16 optimizer (ZeRO-0) always does, so ZeRO's optimizers (default 2) behave the same.
        "fp16": {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1},
    }
    return merge_extra(generated, dict(speed.deepspeed_extra))


def engine_zero_stage(cfg: Config, dp: int, cuda: bool) -> int:
    """The ZeRO stage DeepSpeed is given: ``parallel.zero_stage``, except that mixed precision at ZeRO-0 on one
    data-parallel rank without a pipeline runs ZeRO-1's flat optimizer when ``speed.flat_optimizer`` is on
    (nothing to partition over one rank: ZeRO-0's states and numerics, without the per-tensor wrapper)."""
    p = cfg.parallel
    flat = p.precision in MIXED_PRECISIONS and p.zero_stage == 0 and p.pp == 1 and dp == 1
    return 1 if flat and switch_on(cfg.speed.flat_optimizer, cuda) else p.zero_stage


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


def _zero(stage: int, overlap_comm: bool = False, contiguous_gradients: bool = True) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Fixed bucket sizes keep communication patterns comparable across model sizes.
        zero.update(
            reduce_bucket_size=ZERO_BUCKET_ELEMENTS,
            allgather_bucket_size=ZERO_BUCKET_ELEMENTS,
            overlap_comm=overlap_comm,
            contiguous_gradients=contiguous_gradients,
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


# What speed.deepspeed_extra may not set: the trainer writes these from its own keys (the key to use instead).
OWNED = {
    "train_batch_size": "parallel.global_batch",
    "train_micro_batch_size_per_gpu": "parallel.micro_batch",
    "gradient_accumulation_steps": "parallel.global_batch (accumulation = global / (micro_batch x dp))",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.* (lr, betas, eps, weight_decay) and speed.fused_adamw",
    "scheduler": "optim.warmup_steps and optim.min_lr (the trainer's own schedule)",
    "bf16": "parallel.precision",
    "fp16": "parallel.precision",
    "amp": "parallel.precision",
    "pipeline": "parallel.pp",
    "activation_checkpointing": "parallel.recompute",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.overlap_comm": "speed.overlap_comm",
    "zero_optimization.contiguous_gradients": "speed.contiguous_gradients",
}
# Top-level DeepSpeed keys its pydantic sub-configs read by literal name, which no constants module lists.
_UNLISTED_KEYS = (
    "wandb", "tensorboard", "csv_monitor", "comet", "compile", "timers", "elasticity", "sparse_attention",
    "eigenvalue", "progressive_layer_drop", "compression_training", "nebula", "weight_quantization",
    "hybrid_engine", "graph_harvesting", "zenflow", "sparse_gradients",
)  # fmt: skip
_CONSTANT_MODULES = (
    "deepspeed.runtime.constants", "deepspeed.runtime.zero.config", "deepspeed.profiling.constants",
    "deepspeed.autotuning.constants", "deepspeed.comm.constants", "deepspeed.runtime.data_pipeline.constants",
    "deepspeed.runtime.swap_tensor.constants", "deepspeed.runtime.activation_checkpointing.config",
    "deepspeed.monitor.config", "deepspeed.runtime.precision_config",
)  # fmt: skip


def deepspeed_keys() -> set[str]:
    """Names DeepSpeed reads from its config (a superset of its top-level keys: every lower-case string
    constant of its config modules), to catch a misspelt ``speed.deepspeed_extra`` key before start."""
    import importlib

    names = set(_UNLISTED_KEYS)
    for module in _CONSTANT_MODULES:
        try:
            values = vars(importlib.import_module(module)).items()
        except ImportError:  # a module another DeepSpeed version lacks
            continue
        names |= {v for k, v in values if k.isupper() and isinstance(v, str) and v.islower() and v.isidentifier()}
    return names


def extra_problem(extra: dict[str, Any], known: set[str] | None = None) -> tuple[str, str] | None:
    """(dotted key, fix) of the first thing wrong with ``speed.deepspeed_extra``, or None: a key the trainer
    owns (named with the trainer key to use), or an unknown top-level key (with the nearest known one)."""
    import difflib

    for path in _paths(extra):
        for owned, instead in OWNED.items():
            if path == owned or path.startswith(owned + "."):
                return path, f"the trainer sets it; use {instead} instead"
    known = deepspeed_keys() if known is None else known
    for key in extra:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            return key, f"not a DeepSpeed config key{hint} (see deepspeed.runtime.constants)"
    return None


def _paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path of a nested dict, inner nodes included."""
    out = []
    for key, value in tree.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out += _paths(value, f"{prefix}{key}.")
    return out


def merge_extra(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` deep-merged in (nested dicts merged key by key, anything else replaced);
    neither argument is changed."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_extra(merged[key], value)
        else:
            merged[key] = value
    return merged
