"""A checkpoint's ``manifest.json`` (the size and SHA-256 of every file of a step directory) and checking
files against it, with the work split over the ranks that share the step directory.

Hashing a checkpoint means reading all of it. Done by every rank (or by one), N ranks read the whole
checkpoint N times and the largest runs start and save as slowly as one disk read of everything allows.
Here every rank hashes only its share of the files (``share``: the same balanced split on every rank,
computed from the sizes), so a save or a resume reads each byte once, spread over the world; the
cheap part (the manifest is readable, every file is there at its size: a truncated or half-copied
checkpoint) stays a check every process makes alone, before any process group exists.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path

from trainer.parallel.mappings import gather_objects

MANIFEST = "manifest.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sizes_of(step_dir: Path) -> dict[str, int]:
    """Every file of ``step_dir`` but the manifest, by path relative to it: its bytes."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(step_dir)): p.stat().st_size for p in files}


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files ``rank`` hashes: largest first, each to the rank with the fewest bytes so far (ties to the
    lower rank). Deterministic in ``sizes``, so every rank computes the same split without talking."""
    if world == 1:
        return sorted(sizes)
    loads = [(0, r) for r in range(world)]
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, owner = heapq.heappop(loads)
        if owner == rank:
            mine.append(name)
        heapq.heappush(loads, (load + sizes[name], owner))
    return mine


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write(step_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Write ``step_dir``'s manifest. With ``world`` > 1 a collective of every rank of the default process
    group, the files complete on every rank's view: rank 0 lists them, each rank hashes its share, rank 0
    writes the manifest."""
    listing = [sizes_of(step_dir) if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(listing, src=0)
    sizes, digests = listing[0], {}
    for part in gather_objects({name: sha256(step_dir / name) for name in share(sizes, rank, world)}):
        digests.update(part)
    if rank == 0:
        entries = {name: {"bytes": size, "sha256": digests[name]} for name, size in sizes.items()}
        write_atomic(step_dir / MANIFEST, json.dumps({"files": entries}, indent=1))


def damage(step_dir: Path, rank: int = 0, world: int = 1, hashes: bool = True) -> str | None:
    """Why ``step_dir`` cannot be trusted, or None: its manifest is readable and lists every file at its
    size, and (``hashes``) the files of this rank's share match their checksums (all of them at world 1)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (incomplete save)"
    try:
        entries = json.loads(manifest.read_text())["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return "manifest.json is unreadable"
    for name, size in sizes.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    for name in share(sizes, rank, world) if hashes else ():
        if sha256(step_dir / name) != entries[name].get("sha256"):
            return f"{name} does not match its checksum"
    return None


def damage_together(step_dir: Path, rank: int, world: int) -> str | None:
    """``damage`` over every file, each rank hashing its share: a collective of the default process group
    whose answer is the same on every rank (the lowest rank's reason when several find one)."""
    return next((why for why in gather_objects(damage(step_dir, rank, world)) if why is not None), None)
