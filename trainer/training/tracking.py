"""Weights & Biases tracking that never blocks or fails a run.

``logging.wandb.mode``: auto = online when WANDB_API_KEY is set, offline otherwise (sync later
with ``wandb sync <run_dir>/wandb/offline-run-*``); disabled = no wandb at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from trainer.config.schema import WandbConfig


def effective_mode(cfg: WandbConfig) -> str:
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if cfg.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("wandb: logging.wandb.mode=online but WANDB_API_KEY is not set; logging offline", file=sys.stderr)
        return "offline"
    return cfg.mode


def start_run(cfg: WandbConfig, run_dir: Path, config: dict[str, Any], default_name: str):
    """A wandb run on the writer rank, or None (disabled, or wandb could not start)."""
    mode = effective_mode(cfg)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            mode=mode,
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or default_name,
            group=cfg.group or None,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
        )
    except Exception as err:  # a tracking outage must not stop training
        print(f"wandb: could not start ({type(err).__name__}: {err}); continuing without it", file=sys.stderr)
        return None
