"""Import a Hugging Face GPT-2 directory as a checkpoint to continue training or fine-tune.

    python -m trainer.import_hf HF_DIR OUT_STEP_DIR

HF_DIR is a local directory as ``save_pretrained`` writes it (config.json, model.safetensors or its
shards or pytorch_model.bin, tokenizer files), for example one made by ``trainer.export``. The
output is a step directory in the layout-independent form of ``trainer.checkpoint.consolidate`` (fp32 weights,
meta.json at step 0, tokenizer/, manifest.json) that ``train.init_from=OUT_STEP_DIR`` loads into any
parallel layout with a fresh optimizer. Models this GPT cannot compute exactly (another MLP width or
activation, an untied head, ...) are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import consolidate, sharded
from trainer.checkpoint import store as checkpoint
from trainer.config.schema import BadInput
from trainer.hf import convert as hf
from trainer.hf.files import check_output_dir, copy_tokenizer_files, staged


def read_config(hf_dir: Path) -> dict:
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not hf_dir.exists() else "has no config.json"
        raise BadInput(f"HF_DIR {hf_dir} {what}; give a local Hugging Face model directory (save_pretrained's output)")
    try:
        return json.loads(config_file.read_text())
    except ValueError as err:
        raise BadInput(f"{config_file} is not valid JSON ({err}); fix or re-save the model") from None


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict from ``hf_dir``, fp32. transformers reads every format it writes
    (single or sharded safetensors, pytorch_model.bin, older key names) and fills the tied head."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # our own message says what went wrong, on one line
    logging.disable_progress_bar()
    try:
        net, info = GPT2LMHeadModel.from_pretrained(
            hf_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BadInput(f"{hf_dir}: cannot load the GPT-2 weights: {err}") from None
    # A tied head is not stored; an untied one that is missing is caught by hf.check_tied.
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
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


def streamed_tensors(hf_dir: Path, model: dict[str, int]):
    """(kind, our name, produce) for every tensor, read from the safetensors files one at a time; None
    when the files are not GPT2LMHeadModel's current names (transformers then loads the model whole)."""
    from safetensors import safe_open

    where = safetensors_index(hf_dir)
    plan = hf.ours_plan(model)
    if where is None or any(hf_name not in where for _, hf_name, _ in plan):
        return None

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), "pt") as f:
            return f.get_tensor(name)

    wte = f"{hf.HF_PREFIX}wte.weight"
    if "lm_head.weight" in where:
        hf.check_tied({"lm_head.weight": read("lm_head.weight"), wte: read(wte)})
    return [("model", ours, lambda h=hf_name, c=convert: c(read(h))) for ours, hf_name, convert in plan]


def import_hf(hf_dir: Path, out: Path) -> str:
    check_output_dir(out)  # before the (possibly long) load
    model = hf.model_shape(read_config(hf_dir))
    items = streamed_tensors(hf_dir, model)
    if items is None:
        state = hf.from_hf(load_hf_state(hf_dir), model)
        items = [("model", name, lambda t=t: t) for name, t in state.items()]
    with staged(out) as tmp:
        params = sharded.write_stream(tmp, items)
        layout = {"source": "hf", "path": str(hf_dir.resolve())}
        consolidate.write_meta(tmp, {"model": model, "step": 0, "tokens": 0, "adam_step": 0, "layout": layout})
        has_tokenizer = write_tokenizer(hf_dir, tmp / checkpoint.TOKENIZER_DIR)
        checkpoint.write_manifest(tmp)  # so train.init_from verifies it like any checkpoint
    overrides = " ".join(f"model.{k}={v}" for k, v in model.items())
    if has_tokenizer:
        overrides += f" data.tokenizer.source={out / checkpoint.TOKENIZER_DIR}"
    note = "" if has_tokenizer else " (no tokenizer files in HF_DIR)"
    return (
        f"imported {hf_dir} to {out}: {params:,} parameters{note}; train from it with train.init_from={out} {overrides}"
    )
