"""A trained model as one dense, single-process GPT, from a checkpoint of any layout or a Hugging Face
directory.

A checkpoint's layout-independent state (``trainer.checkpoint.sharded``) holds every weight under the
dense GPT's names whatever tp·pp·dp·ZeRO wrote it, so every layout loads the same way, a tensor at a
time. A Hugging Face directory (GPT-2 or Llama, as ``trainer.hf`` converts them) is read through the same
conversion as ``trainer.import_hf``. Vocabulary padding rows added by tensor parallelism are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.schema import BadInput
from trainer.model import GPT, ModelShape


@dataclass
class Loaded:
    model: GPT  # eval mode, fp32 unless asked otherwise
    shape: ModelShape
    tokenizer: Path | None  # tokenizer.json or a directory holding one
    source: str  # what was loaded, for the user
    step: int | None  # the checkpoint's step (None for a Hugging Face directory)
    step_dir: Path | None  # the checkpoint step directory (None for a Hugging Face directory)


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Loaded:
    """``path``: a step directory, a checkpoints directory, a run directory, or a Hugging Face model directory.
    BadInput (one line) when it is none of them or is damaged."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        loaded = _from_hf(path)
    else:
        loaded = _from_checkpoint(path)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _build(shape: ModelShape, tensors) -> GPT:
    """A dense GPT of ``shape`` filled from (our name, produce) pairs, one tensor at a time."""
    with torch.device("meta"):
        model = GPT(shape)
    model.to_empty(device="cpu")  # (new parameter objects: look them up afterwards)
    params = dict(model.named_parameters())
    missing = set(params)
    with torch.no_grad():
        for name, produce in tensors:
            if name not in params:
                raise BadInput(f"the weights hold {name!r}, which a model of this shape does not have")
            tensor = produce()
            params[name].copy_(tensor[: params[name].shape[0]] if name in _VOCAB_ROWS else tensor)
            missing.discard(name)
    if missing:
        raise BadInput(f"the weights lack {sorted(missing)[:3]}; the checkpoint is incomplete")
    return model


_VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # may carry tensor parallelism's padding rows


def _from_checkpoint(path: Path) -> Loaded:
    from trainer.checkpoint import consolidate, manifest, sharded
    from trainer.checkpoint import store as checkpoint
    from trainer.hf.export import find_step_dir

    step_dir = find_step_dir(path)
    damaged = manifest.damage(step_dir)
    if damaged:
        raise BadInput(f"checkpoint {step_dir} is damaged: {damaged}; give another step directory")
    try:
        meta = consolidate.read_meta(step_dir)
        shape = ModelShape.from_meta(meta["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise BadInput(f"checkpoint {step_dir}: unreadable meta.json ({err})") from None
    names = sharded.tensor_names(step_dir, "model")
    model = _build(shape, [(name, lambda n=name: sharded.read_tensor(step_dir, "model", n)) for name in names])
    tokenizer = step_dir / checkpoint.TOKENIZER_DIR
    return Loaded(
        model,
        shape,
        tokenizer if (tokenizer / "tokenizer.json").is_file() else None,
        f"{step_dir} (step {meta.get('step')})",
        meta.get("step"),
        step_dir,
    )


def _from_hf(hf_dir: Path) -> Loaded:
    from trainer.hf import convert as hf
    from trainer.hf.importer import load_hf_state, read_config, streamed_tensors

    config = read_config(hf_dir)
    family = hf.family_for(config)
    shape = ModelShape.from_meta(family.model_meta(config))
    items = streamed_tensors(hf_dir, shape, family)
    if items is None:
        state = hf.from_hf(load_hf_state(hf_dir, shape, family), shape, family)
        tensors = [(name, lambda t=t: t) for name, t in state.items()]
    else:
        tensors = [(name, produce) for _, name, produce in items]
    model = _build(shape, tensors)
    tokenizer = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return Loaded(model, shape, tokenizer, f"{hf_dir} ({family.name})", None, None)
