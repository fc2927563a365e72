"""What a run needs to know about a checkpoint before and after the engine exists: its model shape and
layout (``meta.json``), whether it fits this config (checked before any process group starts), and the
step a run continues from.
"""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import store as checkpoint
from trainer.checkpoint.consolidate import read_meta
from trainer.config.schema import BadInput, Config, ConfigError
from trainer.model.shape import ARCH_FIELDS, ModelShape
from trainer.runtime.hardware import memory_window


def model_meta(cfg: Config) -> dict:
    """meta.json's "model": the sizes (the vocabulary before tp padding) and the architecture."""
    return ModelShape.from_config(cfg.model).meta()


def layout_of(dims, ds_dict: dict) -> dict:
    """meta.json's "layout", with the ZeRO stage the engine runs (``speed.flat_optimizer`` runs ZeRO-1 at dp 1
    for ZeRO-0): DeepSpeed's own files are reloaded only by the optimizer that wrote them."""
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": ds_dict["zero_optimization"]["stage"]}


def check_model_matches(cfg: Config, step_dir: Path) -> None:
    """A checkpoint of another model shape is bad input, found before any process group starts."""
    try:
        saved = read_meta(step_dir)["model"]
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"checkpoint {step_dir}: unreadable meta.json ({err})") from None
    ours = model_meta(cfg)
    theirs = ModelShape.from_meta(saved).meta()  # a checkpoint without architecture fields is a GPT-2 model
    for key in ("n_layer", "n_embd", "n_head", "seq_len", *ARCH_FIELDS):
        if theirs.get(key) != ours[key]:
            raise ConfigError(
                f"model.{key}",
                ours[key],
                f"the checkpoint {step_dir} has {key}={theirs.get(key)}; use the same model shape to load it",
            )


def restore(engine, saver, found, start_from, stream, console) -> tuple[int, dict | None]:
    """Resume (same layout: exact; other layout: resharded) or start from given weights: the start step
    and this rank's time and memory of the load (None when nothing was loaded)."""
    if found is None:
        if start_from is None:
            return 0, None
        with memory_window() as io:
            checkpoint.init_weights_from(engine, start_from.step_dir, saver.mesh, saver.named_params)
        io["state_bytes"] = 0
        console.print(f"initialised weights from {start_from.step_dir}")
        return 0, io
    for why in found.skipped:
        console.print(f"warning: skipping damaged checkpoint {why}")
    resumed = checkpoint.load(engine, found, saver.mesh, saver.named_params, saver.meta["layout"])
    if resumed.stream is not None:
        stream.load_state_dict(resumed.stream)
    console.print(f"resumed from {found.step_dir} at step {resumed.step} ({resumed.how})")
    return resumed.step, resumed.io
