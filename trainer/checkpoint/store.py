"""Checkpoints: atomic saves, verified resume, and continuing at another parallel layout.

``<run_dir>/checkpoints/step_<n>/`` holds DeepSpeed's files for every rank (they load back only
into the layout that wrote them), the layout-independent form (``trainer.checkpoint.consolidate``,
written and read shard by shard: ``trainer.checkpoint.sharded``), one RNG
file per rank, the tokenizer, the resolved ``config.yaml``, and ``manifest.json`` (size and SHA-256
of every file).

A save is written under ``checkpoints/.staging/`` and renamed into place only when complete; the
manifest is written just before that rename and ``checkpoints/latest`` (the newest tag) after it,
each by an atomic replace. A crash at any point leaves every published checkpoint as it was.
Resume verifies the manifest of the newest checkpoint and falls back to older ones, saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import consolidate, sharded
from trainer.config.schema import BadInput
from trainer.runtime.hardware import memory_window

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STAGING = ".staging"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
_TAG = re.compile(r"^step_(\d+)$")


# --- files ----------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(step_dir: Path) -> None:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_atomic(step_dir / MANIFEST, json.dumps({"files": entries}, indent=1))


def damage(step_dir: Path) -> str | None:
    """Why ``step_dir`` cannot be trusted (None if its files match its manifest)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (incomplete save)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, entry in entries.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


# --- choosing what to resume from (before any process group exists) ------------------------------


@dataclass(frozen=True)
class Found:
    step_dir: Path
    skipped: tuple[str, ...]  # "step_20: <why>" for every newer checkpoint passed over

    @property
    def root(self) -> Path:
        return self.step_dir.parent

    @property
    def tag(self) -> str:
        return self.step_dir.name


def _candidates(root: Path) -> list[Path]:
    """Published checkpoints of ``root``, newest first (``latest`` first if it names one)."""
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)), key=_step_of, reverse=True)
    latest = root / LATEST
    named = latest.read_text().strip() if latest.is_file() else ""
    return sorted(steps, key=lambda p: p.name != named)


def _step_of(path: Path) -> int:
    return int(_TAG.match(path.name).group(1))


def find(spec: str, run_dir: Path) -> Found | None:
    """The checkpoint ``train.resume`` / ``train.init_from`` names, verified; None to start fresh.

    ``auto``: the newest sound checkpoint of this run directory (None if it has none at all). A
    path: a checkpoints directory (its newest sound one) or one step directory (that one only).
    Raises BadInput when checkpoints exist but none is usable.
    """
    if not spec:
        return None
    path = run_dir / CHECKPOINTS if spec == "auto" else Path(spec)
    if (path / consolidate.META_FILE).is_file() or _TAG.match(path.name):
        why = damage(path)
        if why:
            raise BadInput(f"checkpoint {path} is damaged: {why}; pick another step directory")
        return Found(path, ())
    candidates = _candidates(path) if path.is_dir() else []
    if not candidates:
        if spec == "auto":
            return None
        raise BadInput(f"train.resume={spec}: no checkpoints there; use auto, a checkpoints or step_<n> directory")
    skipped = []
    for step_dir in candidates:
        why = damage(step_dir)
        if why is None:
            return Found(step_dir, tuple(skipped))
        skipped.append(f"{step_dir.name}: {why}")
    raise BadInput(f"no usable checkpoint in {path} ({'; '.join(skipped)}); start fresh with train.resume=''")


# --- saving -----------------------------------------------------------------------------------------


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); nothing was published."""


def check_writable(run_dir: Path) -> None:
    """Refuse, before any process group starts, a run whose checkpoints could not be written."""
    root = run_dir / CHECKPOINTS
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise BadInput(
            f"checkpoint directory {root} is not writable ({err.strerror}); "
            "fix it, choose another hydra.run.dir, or set train.save_interval=-1"
        ) from None


@dataclass
class Saver:
    """Writes checkpoints of one run; every rank calls ``save`` at the same step."""

    engine: Any
    mesh: Any
    named_params: Any  # () -> iterable of (dense GPT name, parameter) on this rank
    run_dir: Path
    meta: dict[str, Any]  # model shape and layout, recorded in every meta.json
    tokenizer_dir: Path | None
    keep_last: int = 0

    @property
    def root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        """Write and publish ``step_<step>``; a failed write raises SaveError and publishes nothing.
        ``self.io`` then holds this rank's time, memory and bytes of the save."""
        try:
            with memory_window() as self.io:
                return self._save(step, client_state)
        except OSError as err:
            latest = self.root / LATEST
            newest = latest.read_text().strip() if latest.is_file() else "none"
            raise SaveError(
                f"checkpoint step_{step} could not be written ({err}); published checkpoints are untouched "
                f"(newest: {newest}); free space or fix permissions, then continue with train.resume=auto"
            ) from None

    def _save(self, step: int, client_state: dict[str, Any]) -> Path:
        import torch.distributed as dist

        tag, staging = f"step_{step}", self.root / STAGING
        is_writer = dist.get_rank() == 0
        if is_writer:
            shutil.rmtree(staging / tag, ignore_errors=True)  # a save that crashed half-way
            staging.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        self._write_consolidated(staging / tag, step, client_state)
        self.io["state_bytes"] = sharded.rank_file_bytes(staging / tag, dist.get_rank())
        _save_rng(staging / tag, dist.get_rank())
        dist.barrier()
        if is_writer:
            self._publish(staging / tag)
        dist.barrier()
        return self.root / tag

    def _write_consolidated(self, step_dir: Path, step: int, client_state: dict[str, Any]) -> None:
        sharded.save(self.engine, self.named_params(), self.mesh, step_dir)  # each rank its own slices
        if self.mesh.rank == 0:
            sched = self.engine.lr_scheduler
            consolidate.write_meta(
                step_dir,
                {
                    **self.meta,
                    "step": step,
                    "tokens": client_state.get("tokens", 0),
                    "adam_step": consolidate.adam_step(self.engine),
                    "lr_last_epoch": sched.last_epoch if sched is not None else step,
                    "stream": client_state.get("stream"),
                },
            )
            if self.tokenizer_dir is not None:
                shutil.copytree(self.tokenizer_dir, step_dir / TOKENIZER_DIR, dirs_exist_ok=True)
            if (self.run_dir / "config.yaml").is_file():  # the resolved config the weights were trained with
                shutil.copy2(self.run_dir / "config.yaml", step_dir / "config.yaml")

    def _publish(self, staged: Path) -> None:
        write_manifest(staged)
        target = self.root / staged.name
        if target.exists():  # re-saving a step (resumed from an older checkpoint): replace it whole
            old = self.root / STAGING / f"replaced-{staged.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
        _write_atomic(self.root / LATEST, staged.name + "\n")
        self._prune(keep=staged.name)

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        published = sorted((p for p in self.root.iterdir() if _TAG.match(p.name)), key=_step_of, reverse=True)
        for old in [p for p in published if p.name != keep][self.keep_last - 1 :]:
            shutil.rmtree(old, ignore_errors=True)


# --- loading ----------------------------------------------------------------------------------------


def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def _save_rng(step_dir: Path, rank: int) -> None:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    path = _rng_file(step_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _load_rng(step_dir: Path, rank: int) -> None:
    state = torch.load(_rng_file(step_dir, rank), weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class Resumed:
    step: int
    tokens: int
    stream: dict[str, int] | None
    how: str  # what was restored, for the log
    io: dict[str, float]  # this rank's time and memory of the load


def load(engine, found: Found, mesh, named_params, layout: dict[str, Any]) -> Resumed:
    """Continue from ``found``: DeepSpeed's own files at the same layout (exact: optimizer, RNG),
    otherwise the layout-independent form (weights and Adam moments resharded; RNG not carried)."""
    with memory_window() as io:
        resumed = _load(engine, found, mesh, named_params, layout)
    io["state_bytes"] = sharded.rank_file_bytes(found.step_dir, mesh.rank)
    return Resumed(resumed.step, resumed.tokens, resumed.stream, resumed.how, io)


def _load(engine, found: Found, mesh, named_params, layout: dict[str, Any]) -> Resumed:
    meta = consolidate.read_meta(found.step_dir)
    if meta.get("layout") == layout:
        _, client = engine.load_checkpoint(str(found.root), tag=found.tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {found.step_dir}")
        _load_rng(found.step_dir, mesh.rank)
        return Resumed(client["step"], client.get("tokens", 0), client.get("stream"), "same layout, exact", {})
    restored = _load_sharded(engine, found.step_dir, mesh, named_params, moments=True, step=meta["adam_step"])
    _fast_forward(engine.lr_scheduler, meta["lr_last_epoch"])
    engine.global_steps = meta["step"]  # DeepSpeed's own count, as its files would have restored it
    moments = "Adam moments resharded" if restored else "Adam moments restart from zero (the checkpoint has none)"
    how = f"resharded from {_layout_str(meta.get('layout'))} to {_layout_str(layout)}: weights and {moments}"
    return Resumed(meta["step"], meta.get("tokens", 0), meta.get("stream"), how, {})


def init_weights_from(engine, step_dir: Path, mesh, named_params) -> None:
    """``train.init_from``: weights only (a fresh optimizer and schedule), from any layout or an import."""
    _load_sharded(engine, step_dir, mesh, named_params, moments=False, step=0)


def _load_sharded(engine, step_dir: Path, mesh, named_params, moments: bool, step: int) -> bool:
    """Read this rank's slices of the layout-independent form and hand them to the engine; whether the
    Adam moments were restored (not from weights-only state)."""
    named = list(named_params())
    saved = sharded.saved_shapes(step_dir)
    moments = moments and any(k.startswith("exp_avg.") for k in saved)
    kinds = sharded.KINDS if moments else ("model",)
    items = sharded.load_parts(named, mesh, step_dir, kinds, engine.device.type)
    return consolidate.load_into(engine, named, items, mesh, moments, step)


def _fast_forward(scheduler, last_epoch: int) -> None:
    if scheduler is not None:
        scheduler.last_epoch = last_epoch - 1
        scheduler.step()


def _layout_str(layout: dict[str, Any] | None) -> str:
    if not layout:
        return "an unknown layout"
    return "tp{tp}·pp{pp}·dp{dp} zero{zero_stage}".format(**layout)
