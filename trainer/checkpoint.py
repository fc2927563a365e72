"""Checkpoints through the DeepSpeed engine, with the client state needed to continue.

Layout: ``<run_dir>/checkpoints/step_<n>/`` (DeepSpeed's files for every rank: model and
optimizer shards, per pipeline layer at pp>1) and ``checkpoints/latest`` naming the newest tag.
A checkpoint loads back into a run of the same layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LATEST = "latest"


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` (every rank takes part; DeepSpeed collects)."""
    directory = run_dir / "checkpoints"
    engine.save_checkpoint(str(directory), tag=f"step_{step}", client_state={"step": step, **client_state})
    return directory / f"step_{step}"


def locate(spec: str, run_dir: Path) -> tuple[Path, str] | None:
    """(checkpoints directory, tag) that ``train.resume`` names, or None to start fresh.

    ``auto``: the newest checkpoint of this run directory, if any. A path: a checkpoints directory
    (its newest) or one ``step_<n>`` directory in it.
    """
    if not spec:
        return None
    path = run_dir / "checkpoints" if spec == "auto" else Path(spec)
    if (path / LATEST).is_file():
        return path, (path / LATEST).read_text().strip()
    if spec != "auto" and path.is_dir() and (path.parent / LATEST).is_file():
        return path.parent, path.name
    return None


def load(engine, where: tuple[Path, str]) -> dict[str, Any]:
    """Restore model, optimizer and scheduler; return the client state saved with them."""
    directory, tag = where
    loaded, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if loaded is None:
        raise RuntimeError(f"could not load checkpoint {directory / tag}")
    return client_state
