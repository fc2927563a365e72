"""Export a checkpoint of any parallel layout as a Hugging Face GPT-2 or Llama directory.

    python -m trainer.export CHECKPOINT OUT_DIR [--tokenizer DIR]

CHECKPOINT is a step directory (``runs/<id>/checkpoints/step_<n>``), a checkpoints directory (the
step its ``latest`` file names) or a run directory. The checkpoint's layout-independent state
(``trainer.checkpoint.consolidate``) holds the tensors under the dense GPT's names whatever tp·pp·dp wrote
them, so every layout exports the same way. The model's architecture picks the family (``hf.family_of``):
GPT-2 -> ``GPT2LMHeadModel``, Llama-style (RMSNorm, SwiGLU, rotary) -> ``LlamaForCausalLM``; any other mix
is refused. OUT_DIR receives config.json, model.safetensors (fp32; a tied head is not stored),
generation_config.json and the tokenizer files; ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)`` load it offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoint import consolidate, manifest, sharded
from trainer.checkpoint import store as checkpoint
from trainer.config.schema import BadInput
from trainer.hf import convert as hf
from trainer.hf.files import check_output_dir, copy_tokenizer_files, staged, write_safetensors
from trainer.model.shape import SIZE_FIELDS, ModelShape

HF_WEIGHTS = "model.safetensors"


def find_step_dir(path: Path) -> Path:
    """The step directory CHECKPOINT names: itself, or what ``[checkpoints/]latest`` names."""
    if (path / consolidate.META_FILE).is_file():
        return path
    for root in (path, path / checkpoint.CHECKPOINTS):
        latest = root / checkpoint.LATEST
        if latest.is_file():
            step_dir = root / latest.read_text().strip()
            if not (step_dir / consolidate.META_FILE).is_file():
                raise BadInput(
                    f"{latest} names {step_dir.name}, which has no {consolidate.META_FILE}; give a step directory"
                )
            return step_dir
    what = "does not exist" if not path.exists() else f"has no {consolidate.META_FILE} and no [checkpoints/]latest"
    raise BadInput(
        f"CHECKPOINT {path} {what}; give a step directory (runs/<id>/checkpoints/step_<n>), "
        "its checkpoints directory or the run directory"
    )


def _tokenizer_source(step_dir: Path, override: Path | None) -> Path:
    """The tokenizer to ship: ``--tokenizer`` if given, else the checkpoint's own copy."""
    src = override if override is not None else step_dir / checkpoint.TOKENIZER_DIR
    if (src.is_dir() and (src / "tokenizer.json").is_file()) or src.is_file():
        return src
    if override is not None:
        raise BadInput(
            f"--tokenizer {src}: no tokenizer.json there; give an HF tokenizer directory or a tokenizer.json"
        )
    raise BadInput(
        f"{step_dir} has no {checkpoint.TOKENIZER_DIR}/ with a tokenizer.json; pass --tokenizer DIR "
        "(the run's prepared data holds it: data/cache/<name>-<hash>/tokenizer)"
    )


def write_tokenizer(src: Path, dst: Path, vocab_size: int) -> int | None:
    """Write the tokenizer ``src`` (HF directory or bare tokenizer.json) as HF files into ``dst``.

    Returns the id of its end-of-text token (``saved_eot``; None if it has none). A tokenizer whose ids do not fit the
    model's embedding is refused.
    """
    from trainer.data.tokenizer import load_tokenizer, saved_eot

    tok = load_tokenizer(src)
    if tok.get_vocab_size() > vocab_size:
        raise hf.Unsupported(
            f"the tokenizer {src} has {tok.get_vocab_size()} tokens, more than the model's vocab_size={vocab_size}; "
            "pass the run's own tokenizer with --tokenizer"
        )
    if not (src.is_dir() and (src / "tokenizer_config.json").is_file() and copy_tokenizer_files(src, dst)):
        _save_bare_tokenizer(tok, dst)  # a bare tokenizer.json: add the config AutoTokenizer needs
    return tok.token_to_id(saved_eot(src))  # <|endoftext|>, or the run's data.tokenizer.eot


def _save_bare_tokenizer(tok, dst: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from trainer.data.tokenizer import EOT, save_tokenizer

    if tok.token_to_id(EOT) is not None:
        save_tokenizer(tok, dst)
    else:
        PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False).save_pretrained(dst)


def write_hf_model(out: Path, step_dir: Path, shape: ModelShape, eos_token_id: int | None) -> None:
    """config.json, generation_config.json and model.safetensors of the Hugging Face equivalent (GPT-2 or
    Llama, ``hf.family_of``) of the step's weights, read, converted and written one tensor at a time
    (peak: the largest tensor)."""
    import transformers

    family = hf.family_of(shape)
    config = getattr(transformers, family.config_class)(**family.hf_config(shape, eos_token_id))
    config.save_pretrained(out)
    if shape.position == "rope":  # transformers 5 keeps θ in rope_parameters; 4.x reads it at the top level
        written = json.loads((out / "config.json").read_text())
        written.setdefault("rope_theta", shape.rope_theta)
        (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
    items = [
        (hf_name, lambda ours=ours, convert=convert: convert(sharded.read_tensor(step_dir, "model", ours)))
        for hf_name, (ours,), convert in hf.hf_plan(shape, family)
    ]
    # The "pt" format tag is what transformers writes and expects in the safetensors header.
    write_safetensors(out / HF_WEIGHTS, items, hf.hf_shapes(shape, family), metadata={"format": "pt"})


def _model_shape(meta: dict, step_dir: Path) -> ModelShape:
    missing = [key for key in SIZE_FIELDS if key not in meta.get("model", {})]
    if missing:
        raise BadInput(
            f"{step_dir}/{consolidate.META_FILE} lacks model.{', model.'.join(missing)}; the checkpoint is damaged"
        )
    return ModelShape.from_meta(meta["model"])  # without architecture fields: a GPT-2


def export(checkpoint_path: Path, out: Path, tokenizer: Path | None) -> str:
    step_dir = find_step_dir(checkpoint_path)
    damaged = manifest.damage(step_dir) if (step_dir / manifest.MANIFEST).is_file() else None
    if damaged:
        raise BadInput(f"checkpoint {step_dir} is damaged: {damaged}; export another step directory")
    check_output_dir(out)
    meta = consolidate.read_meta(step_dir)
    shape = _model_shape(meta, step_dir)
    family = hf.family_of(shape)  # refuses a mix of fields no Hugging Face family represents
    shapes = {name: tuple(dims) for name, (_, dims) in sharded.saved_shapes(step_dir).items()}
    hf.check_shapes({k.removeprefix("model."): v for k, v in shapes.items() if k.startswith("model.")}, shape)
    src = _tokenizer_source(step_dir, tokenizer)
    with staged(out) as tmp:
        eot = write_tokenizer(src, tmp, shape.vocab_size)
        write_hf_model(tmp, step_dir, shape, eot)
    heads = f"{shape.n_head} heads" + (f" ({shape.kv_heads} key/value)" if shape.kv_heads != shape.n_head else "")
    return (
        f"exported {step_dir} (step {meta.get('step')}) to {out}: {family.name} ({family.hf_class}) with "
        f"{shape.n_layer} layers, n_embd {shape.n_embd}, {heads}, vocab {shape.vocab_size}, context {shape.seq_len}"
    )
