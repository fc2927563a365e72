"""Checkpoints: atomic saves, verified resume, and continuing at another parallel layout.

``<run_dir>/checkpoints/step_<n>/`` holds DeepSpeed's files for every rank (they load back only
into the layout that wrote them; not written with ``train.deepspeed_files=false``), the
layout-independent form (``trainer.checkpoint.consolidate``, written and read shard by shard:
``trainer.checkpoint.sharded``; enough alone for an exact resume at the same layout), one RNG
file per rank, the tokenizer, the resolved ``config.yaml``, and ``manifest.json`` (size and SHA-256
of every file: ``trainer.checkpoint.manifest``).

A save is written under ``checkpoints/.staging/`` and renamed into place only when complete; the
manifest is written just before that rename and ``checkpoints/latest`` (the newest tag) after it,
each by an atomic replace. A crash at any point leaves every published checkpoint as it was.
Resume verifies the newest checkpoint against its manifest and falls back to older ones, saying why:
sizes before any process group exists (``find``), checksums once it does, each rank hashing its
share of the files (``settle``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import consolidate, manifest, sharded
from trainer.config.schema import BadInput
from trainer.runtime.hardware import memory_window

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STAGING = ".staging"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
_TAG = re.compile(r"^step_(\d+)$")


# --- choosing what to resume from (before any process group exists) ------------------------------


@dataclass(frozen=True)
class Found:
    step_dir: Path
    skipped: tuple[str, ...]  # "step_20: <why>" for every newer checkpoint passed over
    older: tuple[Path, ...] = ()  # the candidates after step_dir, newest first, should its checksums fail
    searched: Path | None = None  # the checkpoints directory it was chosen from (None: one step directory named)

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
    """The checkpoint ``train.resume`` / ``train.init_from`` names, its files all there at the sizes its
    manifest gives (checksums: ``settle``, once the ranks can share the reading); None to start fresh.

    ``auto``: the newest sound checkpoint of this run directory (None if it has none at all). A
    path: a checkpoints directory (its newest sound one) or one step directory (that one only).
    Raises BadInput when checkpoints exist but none is usable.
    """
    if not spec:
        return None
    path = run_dir / CHECKPOINTS if spec == "auto" else Path(spec)
    if (path / consolidate.META_FILE).is_file() or _TAG.match(path.name):
        return _choose([path], None)
    candidates = _candidates(path) if path.is_dir() else []
    if not candidates:
        if spec == "auto":
            return None
        raise BadInput(f"train.resume={spec}: no checkpoints there; use auto, a checkpoints or step_<n> directory")
    return _choose(candidates, path)


def settle(found: Found | None, rank: int, world: int) -> Found | None:
    """``found`` once its checksums are verified, or the next older candidate that verifies (the reasons
    added to ``skipped``). A collective of the default process group: every rank hashes its share of the
    files and all come to the same choice; BadInput on every rank when none is left."""
    while found is not None:
        why = manifest.damage_together(found.step_dir, rank, world)
        if why is None:
            return found
        if found.searched is None:
            raise _damaged(found.step_dir, why)
        skipped = (*found.skipped, f"{found.tag}: {why}")
        found = _choose(list(found.older), found.searched, skipped)
    return None


def _choose(candidates: list[Path], searched: Path | None, skipped: tuple[str, ...] = ()) -> Found:
    """The first candidate whose files are all there at their sizes; BadInput when there is none."""
    skipped = list(skipped)
    for i, step_dir in enumerate(candidates):
        why = manifest.damage(step_dir, hashes=False)
        if why is None:
            return Found(step_dir, tuple(skipped), tuple(candidates[i + 1 :]), searched)
        if searched is None:
            raise _damaged(step_dir, why)
        skipped.append(f"{step_dir.name}: {why}")
    raise BadInput(f"no usable checkpoint in {searched} ({'; '.join(skipped)}); start fresh with train.resume=''")


def _damaged(step_dir: Path, why: str) -> BadInput:
    return BadInput(f"checkpoint {step_dir} is damaged: {why}; pick another step directory")


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


def storage_failure(err: BaseException) -> str | None:
    """Why a write failed where storage is to blame (full disk, permissions), or None for any other error.
    torch.save's C++ writer, which writes DeepSpeed's files, reports a short write (a full disk) as a
    RuntimeError ("unexpected pos N vs M"), not as an OSError."""
    if isinstance(err, OSError):
        return str(err)
    message = str(err)
    if isinstance(err, RuntimeError) and ("unexpected pos" in message or "PytorchStreamWriter failed" in message):
        return "a file was written short: is the disk full?"
    return None


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
    deepspeed_files: bool = True  # False: the sharded state alone (a same-layout resume is exact from it too)

    @property
    def root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        """Write and publish ``step_<step>``; a failed write raises SaveError and publishes nothing.
        ``self.io`` then holds this rank's time, memory and bytes of the save."""
        try:
            with memory_window() as self.io:
                return self._save(step, client_state)
        except (OSError, RuntimeError) as err:
            why = storage_failure(err)
            if why is None:
                raise
            latest = self.root / LATEST
            newest = latest.read_text().strip() if latest.is_file() else "none"
            raise SaveError(
                f"checkpoint step_{step} could not be written ({why}); published checkpoints are untouched "
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
        if self.deepspeed_files:
            self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        self._write_consolidated(staging / tag, step, client_state)
        self.io["state_bytes"] = sharded.rank_file_bytes(staging / tag, dist.get_rank())
        _save_rng(staging / tag, dist.get_rank())
        dist.barrier()
        manifest.write(staging / tag, dist.get_rank(), dist.get_world_size())
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
                    "engine": consolidate.engine_counters(self.engine),
                    "deepspeed_files": self.deepspeed_files,
                },
            )
            if self.tokenizer_dir is not None:
                shutil.copytree(self.tokenizer_dir, step_dir / TOKENIZER_DIR, dirs_exist_ok=True)
            if (self.run_dir / "config.yaml").is_file():  # the resolved config the weights were trained with
                shutil.copy2(self.run_dir / "config.yaml", step_dir / "config.yaml")

    def _publish(self, staged: Path) -> None:
        target = self.root / staged.name
        if target.exists():  # re-saving a step (resumed from an older checkpoint): replace it whole
            old = self.root / STAGING / f"replaced-{staged.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
        manifest.write_atomic(self.root / LATEST, staged.name + "\n")
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
    """Continue from ``found``: at the same layout exactly (optimizer, schedule, RNG), from DeepSpeed's own
    files where the checkpoint has them and DeepSpeed can read them back, else from the sharded state; at
    another layout from the sharded state, resharded (weights and Adam moments; RNG not carried)."""
    with memory_window() as io:
        resumed = _load(engine, found, mesh, named_params, layout)
    io["state_bytes"] = sharded.rank_file_bytes(found.step_dir, mesh.rank)
    return Resumed(resumed.step, resumed.tokens, resumed.stream, resumed.how, io)


def _load(engine, found: Found, mesh, named_params, layout: dict[str, Any]) -> Resumed:
    meta = consolidate.read_meta(found.step_dir)
    same = meta.get("layout") == layout
    files = meta.get("deepspeed_files", True)  # (checkpoints from before the option all had them)
    if same and files and consolidate.deepspeed_resumes(engine):
        _, client = engine.load_checkpoint(str(found.root), tag=found.tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {found.step_dir}")
        _load_rng(found.step_dir, mesh.rank)
        return Resumed(client["step"], client.get("tokens", 0), client.get("stream"), "same layout, exact", {})
    restored = _load_sharded(engine, found.step_dir, mesh, named_params, moments=True, step=meta["adam_step"])
    _fast_forward(engine.lr_scheduler, meta["lr_last_epoch"])
    engine.global_steps = meta["step"]  # DeepSpeed's own count, as its files would have restored it
    if "engine" in meta:
        consolidate.restore_counters(engine, meta["engine"])
    if same:  # the sharded state holds the fp32 masters and Adam's state exactly; each rank's RNG is its own
        _load_rng(found.step_dir, mesh.rank)
        how = "same layout, exact, from the sharded state"
    else:
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
    items = sharded.load_parts(named, mesh, step_dir, kinds, lambda param: consolidate.span(engine, param))
    return consolidate.load_into(engine, items, moments, step, [param for _, param in named])


def _fast_forward(scheduler, last_epoch: int) -> None:
    if scheduler is not None:
        scheduler.last_epoch = last_epoch - 1
        scheduler.step()


def _layout_str(layout: dict[str, Any] | None) -> str:
    if not layout:
        return "an unknown layout"
    return "tp{tp}·pp{pp}·dp{dp} zero{zero_stage}".format(**layout)
