"""Checkpoints through the DeepSpeed engine, with the client state needed to continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` (every rank takes part; DeepSpeed collects)."""
    directory = run_dir / "checkpoints"
    engine.save_checkpoint(str(directory), tag=f"step_{step}", client_state={"step": step, **client_state})
    return directory / f"step_{step}"
