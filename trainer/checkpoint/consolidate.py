"""The layout-independent form of a checkpoint: full tensors under the dense GPT's names.

Beside DeepSpeed's own files (which load back only into the layout that wrote them), every
checkpoint directory holds

- ``model-pp<k>.safetensors``: the fp32 weights of pipeline stage k, each gathered to its full
  size over tensor-parallel ranks (and over ZeRO partitions), named as in ``trainer.model.gpt.GPT``
  (``wte.weight``, ``blocks.3.attn.qkv.weight``, ...). The tied embedding appears in the first and
  the last stage's file; both copies are equal.
- ``optimizer-pp<k>.safetensors``: Adam's ``exp_avg.<name>`` and ``exp_avg_sq.<name>``, same shapes.
- ``meta.json``: format version, model shape, the layout that wrote it, step, tokens, Adam's step.

That is enough to continue at any other tp·pp·dp·ZeRO layout (``load_into``) and to export to other
tools (``trainer.export``). Each stage's tp-rank-0 / dp-rank-0 writes its own file so no rank ever
holds more than one stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.runtime.compat import relink_zero_moments

FORMAT = "trainer-consolidated"
VERSION = 1
META_FILE = "meta.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


# --- reading and writing files (no process group needed) ----------------------------------------


def read_meta(step_dir: Path) -> dict[str, Any]:
    meta = json.loads((Path(step_dir) / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{step_dir}: not a {FORMAT} v{VERSION} checkpoint (meta.json says {meta.get('format')!r})")
    return meta


def read_tensors(step_dir: Path, kind: str = "model") -> dict[str, torch.Tensor]:
    """Every stage's ``<kind>-pp*.safetensors`` merged into one dict (kind: model or optimizer)."""
    files = sorted(Path(step_dir).glob(f"{kind}-pp*.safetensors"))
    if not files:
        raise ValueError(f"{step_dir}: no {kind}-pp*.safetensors files")
    merged: dict[str, torch.Tensor] = {}
    for path in files:
        merged.update(load_file(str(path)))
    return merged


def write_meta(step_dir: Path, meta: dict[str, Any]) -> None:
    (Path(step_dir) / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2))


def write_tensors(step_dir: Path, kind: str, stage: int, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(step_dir) / f"{kind}-pp{stage:02d}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


# --- gathering from / scattering into a running engine -------------------------------------------


def _zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def _full_over_dp(engine, param: nn.Parameter, key: str | None) -> torch.Tensor | None:
    """``param`` (key None) or its Adam moment ``key``, whole over ZeRO partitions, fp32, local tp shard.

    Collective over the data-parallel group when ZeRO partitions the state.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_stage(engine) > 0:
        return safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if key is None:
        return param.detach().float()
    state = engine.optimizer.state.get(param, {})
    return state.get(key)


def _gather_tp(shard: torch.Tensor, param: nn.Parameter, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(tp_group) == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, shard.contiguous(), group=tp_group)  # checkpoint traffic, not counted as training comm
    return torch.cat(parts, dim=param.partition_dim)


def gather_full(engine, named: Iterable[tuple[str, nn.Parameter]], mesh) -> tuple[dict, dict]:
    """(weights, moments) of this stage at full size; every rank of the stage must call it.

    Moments are empty before the optimizer's first step (Adam creates its state lazily).
    """
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    _relink_zero_moments(engine)
    for name, param in named:
        weights[name] = _gather_tp(_full_over_dp(engine, param, None), param, mesh.tp_group)
        for key in MOMENTS:
            value = _full_over_dp(engine, param, key)
            if value is not None:
                local = value.float().reshape(_full_shape(param))
                moments[f"{key}.{name}"] = _gather_tp(local, param, mesh.tp_group)
    return weights, moments


def _relink_zero_moments(engine) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer's current state.

    DeepSpeed 0.19.8 builds those views once; after a skipped (non-finite) step they can miss the
    moments, and ``safe_get_full_optimizer_state`` fails with "exp_avg not found".
    """
    zero = engine.optimizer
    if _zero_stage(engine) in (1, 2):
        if any(zero.optimizer.state.get(flat) for flat in zero.single_partition_of_fp32_groups):
            relink_zero_moments(zero)


def adam_step(engine) -> int:
    """Adam's step count (its bias correction depends on it); 0 before the first step."""
    base = engine.optimizer.optimizer if _zero_stage(engine) > 0 else engine.optimizer
    steps = [int(state["step"]) for state in base.state.values() if "step" in state]
    return max(steps, default=0)


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


def _full_shape(param: nn.Parameter) -> torch.Size:
    """This rank's shape of ``param`` (ZeRO-3 empties the tensor and keeps the shape aside)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _full_rows(param: nn.Parameter, tp_group) -> int:
    rows = _full_shape(param)[0]
    return rows * dist.get_world_size(tp_group) if getattr(param, "tensor_model_parallel", False) else rows


@torch.no_grad()
def load_into(engine, named: Iterable[tuple[str, nn.Parameter]], mesh, weights: dict, moments: dict, step: int) -> bool:
    """Copy full weights (and Adam moments, where the optimizer allows) into this rank's shards.

    Returns whether the moments were restored: with ZeRO-3, or before the optimizer holds state it
    can address, they start from zero and the caller says so.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = list(named)
    stage = _zero_stage(engine)
    restore_moments = bool(moments) and stage < 3
    if restore_moments:
        _create_adam_state(engine, [p for _, p in named], step)
    tp_group = mesh.tp_group
    for name, param in named:
        full = weights[name]
        if name == "wte.weight":
            full = _fit_rows(full, _full_rows(param, tp_group))
        local = _shard(full, param, tp_group).to(param.device)
        if stage > 0:
            safe_set_full_fp32_param(param, local)
        if stage < 3:
            param.copy_(local.to(param.dtype))
        if not restore_moments:
            continue
        for key in MOMENTS:
            value = moments[f"{key}.{name}"]
            if name == "wte.weight":
                value = _fit_rows(value, full.shape[0])
            value = _shard(value, param, tp_group).to(param.device)
            if stage > 0:
                safe_set_full_optimizer_state(param, value, key)
            else:
                engine.optimizer.state[param][key].copy_(value)
    return restore_moments


def _create_adam_state(engine, params: list[nn.Parameter], step: int) -> None:
    """Give Adam zeroed state at ``step`` for every parameter, so the moments can be written in.

    torch's Adam creates its state at the first step; ZeRO-1/2 link each parameter to its slice of
    the flat partition's state only after that (``_lazy_init_hp_params_optimizer_state``).
    """
    if _zero_stage(engine) == 0:
        for param in params:
            engine.optimizer.state[param] = _zero_adam_state(param, step)
        return
    zero = engine.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = _zero_adam_state(flat, step)
    relink_zero_moments(zero)


def _zero_adam_state(param: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    return {
        "step": torch.tensor(float(step)),
        "exp_avg": torch.zeros_like(param, dtype=torch.float32),
        "exp_avg_sq": torch.zeros_like(param, dtype=torch.float32),
    }
