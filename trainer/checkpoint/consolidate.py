"""The layout-independent form of a checkpoint: tensors under the dense GPT's names, whatever layout
wrote them, and the engine-side helpers that read a parameter out of / write it into a running engine.

Every checkpoint directory holds, beside DeepSpeed's own files (which load back only into the layout
that wrote them):

- ``state/``: weights and Adam moments, sharded (``trainer.checkpoint.sharded``);
- ``meta.json``: format version, model shape, the layout that wrote it, step, tokens, Adam's step.

Version 1 (whole tensors per pipeline stage, ``model-pp<k>.safetensors``) is refused with its version.

That is enough to continue at any other tp·pp·dp·ZeRO layout (``load_into``) and to export to other
tools (``trainer.export``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.runtime.compat import (
    hp_fragment,
    refresh_zero3_model_partitions,
    relink_zero_moments,
    update_lp_params,
    zero3_span,
)

FORMAT = "trainer-consolidated"
VERSION = 2  # 2: sharded state/ (DCP); 1 (whole tensors per pipeline stage) is no longer read
META_FILE = "meta.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # one row per (padded) vocabulary entry


# --- reading and writing files (no process group needed) ----------------------------------------


def read_meta(step_dir: Path) -> dict[str, Any]:
    meta = json.loads((Path(step_dir) / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = f"{meta.get('format')!r} v{meta.get('version')}"
        raise ValueError(f"{step_dir}: not a {FORMAT} v{VERSION} checkpoint (meta.json says {found})")
    return meta


def write_meta(step_dir: Path, meta: dict[str, Any]) -> None:
    (Path(step_dir) / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2))


# --- gathering from / scattering into a running engine -------------------------------------------


def _zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def _bf16_pipeline(engine) -> bool:
    """bf16 under a pipeline without ZeRO: DeepSpeed's BF16_Optimizer, whose fp32 masters are flat dp
    partitions each parameter is mapped into, as ZeRO-1/2's are."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer)


def deepspeed_resumes(engine) -> bool:
    """Whether DeepSpeed's own checkpoint files restore this engine at the layout that wrote them.

    Not its BF16_Optimizer (bf16 under a pipeline without ZeRO) in DeepSpeed 0.19.8: its fp32 masters and
    Adam state are partitioned over data parallelism, but they go into the model file, which data-parallel
    rank 0 alone writes (the other ranks' partitions are not saved), and its load indexes that one state
    dict by data-parallel rank (KeyError at every rank). The sharded state holds every partition.
    """
    return not _bf16_pipeline(engine)


def _mapped(engine) -> bool:
    """Whether parameters reach their fp32 masters and moments through DeepSpeed's hp mapping
    (``deepspeed.utils.safe_*``): ZeRO, and the bf16 pipeline."""
    return _zero_stage(engine) > 0 or _bf16_pipeline(engine)


def _master(engine, param: nn.Parameter) -> torch.Tensor:
    """The fp32 copy Adam steps (and keys its state by) for a parameter without hp mapping: the parameter
    itself in fp32, its master in DeepSpeed's bf16/fp16 wrapper at ZeRO-0 (``FP16_UnfusedOptimizer``)."""
    groups = zip(getattr(engine.optimizer, "fp16_groups", ()), getattr(engine.optimizer, "fp32_groups", ()))
    for params, masters in groups:
        for low, master in zip(params, masters):
            if low is param:
                return master
    return param


def relink_moments(engine) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer's current state.

    DeepSpeed 0.19.8 builds those views once; after a skipped (non-finite) step they can miss the
    moments, and ``safe_get_full_optimizer_state`` fails with "exp_avg not found".
    """
    flats = _flat_partitions(engine)
    if flats is not None and any(engine.optimizer.optimizer.state.get(flat) for flat in flats):
        relink_zero_moments(engine.optimizer)


def _flat_partitions(engine) -> list | None:
    """ZeRO-1/2's and the bf16 pipeline's flat fp32 partitions (Adam's state is keyed by them); None elsewhere."""
    if _zero_stage(engine) in (1, 2):
        return engine.optimizer.single_partition_of_fp32_groups
    if _bf16_pipeline(engine):
        return engine.optimizer.fp32_groups_flat_partition
    return None


def adam_step(engine) -> int:
    """Adam's step count (its bias correction depends on it); 0 before the first step."""
    base = engine.optimizer.optimizer if _mapped(engine) else engine.optimizer
    steps = [int(state["step"]) for state in base.state.values() if "step" in state]
    return max(steps, default=0)


SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def engine_counters(engine) -> dict[str, Any]:
    """What DeepSpeed's own files restore besides tensors and the schedule: its skipped-step and sample counts,
    and the loss scaler's state (fp16's dynamic scale and how long since it last changed: without it a resumed
    run starts again from the initial scale and overflows where the uninterrupted run did not)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scale = {k: float(getattr(scaler, k)) for k in SCALER_FIELDS if hasattr(scaler, k)}
    return {"skipped_steps": int(engine.skipped_steps), "global_samples": int(engine.global_samples), "scaler": scale}


def restore_counters(engine, counters: dict[str, Any]) -> None:
    engine.skipped_steps = counters["skipped_steps"]
    engine.global_samples = counters["global_samples"]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in counters["scaler"].items():
        current = getattr(scaler, key, None)
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        elif current is not None:
            setattr(scaler, key, type(current)(value))


def _shard(full: torch.Tensor, param: nn.Parameter, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    return full.chunk(size, param.partition_dim)[rank].contiguous()


def _fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding at another padded vocabulary size: cut padding rows or add zero ones."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros((rows - full.shape[0], *full.shape[1:]))])


def local_shape(param: nn.Parameter) -> torch.Size:
    """This rank's shape of ``param`` (ZeRO-3 empties the tensor and keeps the shape aside)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _full_rows(param: nn.Parameter, tp_group) -> int:
    rows = local_shape(param)[0]
    return rows * dist.get_world_size(tp_group) if getattr(param, "tensor_model_parallel", False) else rows


def span(engine, param: nn.Parameter) -> tuple[int, int]:
    """The flat range ``[start, stop)`` of this rank's tp shard of ``param`` whose fp32 master and Adam
    moments this rank holds: its ZeRO partition (possibly empty), or all of it without ZeRO."""
    if _zero_stage(engine) == 3:
        return zero3_span(param)
    if _mapped(engine):
        fragment = hp_fragment(param)
        return (0, 0) if fragment is None else (fragment[0], fragment[0] + fragment[1].numel())
    return 0, local_shape(param).numel()


def partitioned(engine) -> bool:
    """Whether each data-parallel rank holds only its partition of the fp32 masters and moments."""
    return _mapped(engine)


def read_span(engine, param: nn.Parameter, key: str | None) -> torch.Tensor:
    """This rank's ``span`` of a master (``key`` None) or Adam moment, flat fp32: what it holds, nothing
    gathered. Moments must exist (after the optimizer's first step)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    start, stop = span(engine, param)
    if _zero_stage(engine) == 3:  # the partition, padded to the same size on every rank
        local = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
        return local.detach().flatten()[: stop - start].float()
    if _mapped(engine):
        fragment = hp_fragment(param, key)
        return torch.empty(0) if fragment is None else fragment[1].detach().flatten().float()
    master = _master(engine, param)
    value = master if key is None else engine.optimizer.state[master][key]
    return value.detach().flatten().float()


@torch.no_grad()
def load_into(engine, items: Iterable, moments: bool, step: int, params: list[nn.Parameter]) -> bool:
    """Copy saved weights (and Adam moments, when ``moments``) into this rank's share of the engine.

    ``items`` yields ``(name, param, {kind: values})`` for ``params``, each value the flat range
    ``span(engine, param)`` of a saved tensor. Under ZeRO only the fp32 masters and moments are written;
    the model's weights are then refreshed from them (ZeRO-1/2 all-gather them over data parallelism, as
    after a step). Returns whether the moments were restored.
    """
    stage = _zero_stage(engine)
    if moments:
        _create_adam_state(engine, params, step)
    for _, param, saved in items:
        for kind, values in saved.items():
            _write(engine, param, None if kind == "model" else kind, values.to(param.device))
    if stage == 3:
        refresh_zero3_model_partitions(engine.optimizer)
    elif _mapped(engine):
        update_lp_params(engine.optimizer)
    return moments


def _write(engine, param: nn.Parameter, key: str | None, values: torch.Tensor) -> None:
    """This rank's ``span`` of a master (``key`` None) or Adam moment into the engine."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if _zero_stage(engine) == 3:  # the partition is padded to the same size on every rank
        padded = values.new_zeros(param.ds_tensor.numel())
        padded[: values.numel()] = values
        if key is None:
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, key)
    elif _mapped(engine):
        fragment = hp_fragment(param, key)
        if fragment is not None:
            fragment[1].copy_(values)
    else:
        master = _master(engine, param)
        target = master if key is None else engine.optimizer.state[master][key]
        target.copy_(values.view(target.shape))
        if key is None and master is not param:  # bf16/fp16 at ZeRO-0: the model's copy too
            param.copy_(values.view(param.shape))


def to_layout(saved: torch.Tensor, name: str, param: nn.Parameter, tp_group) -> torch.Tensor:
    """A saved tensor as this rank holds it: already its tp shard, or cut from the whole tensor (the
    embedding first padded or trimmed to this layout's vocabulary)."""
    if saved.shape == local_shape(param):
        return saved
    if name in VOCAB_ROWS:
        saved = _fit_rows(saved, _full_rows(param, tp_group))
    return _shard(saved, param, tp_group)


def _create_adam_state(engine, params: list[nn.Parameter], step: int) -> None:
    """Give Adam zeroed state at ``step`` for every parameter, so the moments can be written in.

    torch's Adam creates its state at the first step; ZeRO-1/2 link each parameter to its slice of
    the flat partition's state only after that (``_lazy_init_hp_params_optimizer_state``); ZeRO-3 keys
    the state by each sub-group's flat fp32 partition, where ``set_full_hp_param`` finds a parameter's slice.
    """
    if not _mapped(engine):
        for param in params:
            master = _master(engine, param)
            engine.optimizer.state[master] = _zero_adam_state(master, step)
        return
    zero = engine.optimizer
    if _zero_stage(engine) == 3:
        for flat in zero.fp32_partitioned_groups_flat:
            zero.optimizer.state[flat] = _zero_adam_state(flat, step)
        return
    for flat in _flat_partitions(engine):
        zero.optimizer.state[flat] = _zero_adam_state(flat, step)
    relink_zero_moments(zero)


def _zero_adam_state(param: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    return {
        "step": torch.tensor(float(step)),
        "exp_avg": torch.zeros_like(param, dtype=torch.float32),
        "exp_avg_sq": torch.zeros_like(param, dtype=torch.float32),
    }
