"""Import a Hugging Face GPT-2 or Llama directory as a checkpoint to continue training or fine-tune.

    python -m trainer.import_hf HF_DIR OUT_STEP_DIR

HF_DIR is a local directory as ``save_pretrained`` writes it (config.json, model.safetensors or its
shards or pytorch_model.bin, tokenizer files), for example one made by ``trainer.export``. The
output is a step directory in the layout-independent form of ``trainer.checkpoint.consolidate`` (fp32 weights,
meta.json at step 0 whose "model" is the whole architecture, tokenizer/, manifest.json) that
``train.init_from=OUT_STEP_DIR`` loads into any parallel layout with a fresh optimizer. config.json's
model_type picks the family (``gpt2`` or ``llama``); models this trainer cannot compute exactly (a GPT-2
of another MLP width or activation or with an untied head, a Llama with scaled rotary embeddings or
another activation, ...) are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import consolidate, manifest, sharded
from trainer.checkpoint import store as checkpoint
from trainer.config.schema import BadInput
from trainer.hf import convert as hf
from trainer.hf.files import check_output_dir, copy_tokenizer_files, staged
from trainer.model.shape import ModelShape


def read_config(hf_dir: Path) -> dict:
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not hf_dir.exists() else "has no config.json"
        raise BadInput(f"HF_DIR {hf_dir} {what}; give a local Hugging Face model directory (save_pretrained's output)")
    try:
        return json.loads(config_file.read_text())
    except ValueError as err:
        raise BadInput(f"{config_file} is not valid JSON ({err}); fix or re-save the model") from None


def load_hf_state(hf_dir: Path, shape: ModelShape, family: hf.Family) -> dict[str, torch.Tensor]:
    """The HF model's state dict from ``hf_dir``, fp32, loaded whole by transformers, which reads every
    format it writes (single or sharded safetensors, pytorch_model.bin, older key names) and fills a tied
    head."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()  # our own message says what went wrong, on one line
    logging.disable_progress_bar()
    try:
        net, info = getattr(transformers, family.hf_class).from_pretrained(
            hf_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BadInput(f"{hf_dir}: cannot load the {family.name} weights: {err}") from None
    # A tied head is not stored; an untied GPT-2 head that is missing is caught by its check_weights.
    missing = [k for k in info["missing_keys"] if not (k == "lm_head.weight" and shape.tie_embeddings)]
    if missing or info.get("mismatched_keys"):
        what = f"lacks {sorted(missing)[:3]}" if missing else f"has wrong shapes for {info['mismatched_keys'][:3]}"
        raise hf.Unsupported(f"{hf_dir}: the weights file {what}; it does not match its config.json")
    return net.state_dict()


def write_tokenizer(hf_dir: Path, dst: Path) -> bool:
    """The model's tokenizer as tokenizer.json (which the trainer reads) plus HF's files; False if none."""
    if copy_tokenizer_files(hf_dir, dst):
        return True
    if not ((hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()):
        return False
    # Only GPT-2's original vocab.json + merges.txt: let transformers build the fast tokenizer.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(hf_dir, local_files_only=True).save_pretrained(dst)
    return True


def safetensors_index(hf_dir: Path) -> dict[str, Path] | None:
    """HF tensor name -> its safetensors file (one file, or shards with an index); None for other formats."""
    from safetensors import safe_open

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: hf_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def streamed_tensors(hf_dir: Path, shape: ModelShape, family: hf.Family):
    """(kind, our name, produce) for every tensor, read from the safetensors files as each is produced
    (peak: one of our tensors and its HF parts); None when the files do not hold the HF model's current
    names (transformers then loads the model whole)."""
    from safetensors import safe_open

    where = safetensors_index(hf_dir)
    plan = hf.ours_plan(shape, family)
    if where is None or any(name not in where for _, sources, _ in plan for name in sources):
        return None
    shapes = {}
    for file in set(where.values()):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    hf.check_hf_shapes(shapes, shape, family)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), "pt") as f:
            return f.get_tensor(name)

    family.check_weights(read, where.keys())
    return [
        ("model", ours, lambda sources=sources, convert=convert: convert(*map(read, sources)))
        for ours, sources, convert in plan
    ]


def import_hf(hf_dir: Path, out: Path) -> str:
    check_output_dir(out)  # before the (possibly long) load
    config = read_config(hf_dir)
    family = hf.family_for(config)
    model = family.model_meta(config)  # meta.json's "model"; refuses what this model cannot compute
    shape = ModelShape.from_meta(model)
    items = streamed_tensors(hf_dir, shape, family)
    if items is None:
        state = hf.from_hf(load_hf_state(hf_dir, shape, family), shape, family)
        items = [("model", name, lambda t=t: t) for name, t in state.items()]
    with staged(out) as tmp:
        params = sharded.write_stream(tmp, items)
        layout = {"source": "hf", "path": str(hf_dir.resolve())}
        consolidate.write_meta(tmp, {"model": model, "step": 0, "tokens": 0, "adam_step": 0, "layout": layout})
        has_tokenizer = write_tokenizer(hf_dir, tmp / checkpoint.TOKENIZER_DIR)
        manifest.write(tmp)  # so train.init_from verifies it like any checkpoint
    overrides = " ".join(f"model.{k}={override_value(v)}" for k, v in model.items())
    if has_tokenizer:
        overrides += f" data.tokenizer.source={out / checkpoint.TOKENIZER_DIR}"
    note = "" if has_tokenizer else " (no tokenizer files in HF_DIR)"
    return (
        f"imported {hf_dir} to {out}: {family.name}, {params:,} parameters{note}; "
        f"train from it with train.init_from={out} {overrides}"
    )


def override_value(value) -> str:
    """A meta.json value as a Hydra command-line override value."""
    return str(value).lower() if isinstance(value, bool) else str(value)
