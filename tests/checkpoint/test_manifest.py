"""Checkpoint manifests: the split of the hashing over ranks covers every file once, balanced by bytes;
the manifest written by several ranks is the one a single process writes; a damaged file is found by
the rank whose share holds it and every rank agrees on the verdict and on the checkpoint to resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from parallel.spawn import run_ranks

from trainer.checkpoint import manifest
from trainer.checkpoint import store as checkpoint
from trainer.config.schema import BadInput
from trainer.parallel.mappings import gather_objects

SIZES = [7000, 5000, 4000, 3000, 3000, 1200, 900, 10, 0]


def _step_dir(root: Path, tag: str = "step_4") -> Path:
    """A step directory of files of SIZES bytes (random content, a sub-folder too) and its manifest."""
    step_dir = root / "checkpoints" / tag
    rng = random.Random(tag)
    for i, size in enumerate(SIZES):
        path = step_dir / ("state" if i % 3 == 0 else "") / f"file_{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    manifest.write(step_dir)
    return step_dir


def _garble(path: Path) -> None:
    """Same size, other bytes: only a checksum can tell."""
    path.write_bytes(bytes(255 - b for b in path.read_bytes()))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 16])
def test_share_covers_every_file_once_balanced_by_bytes(world):
    sizes = {f"f{i}": size for i, size in enumerate(SIZES)}
    shares = [manifest.share(sizes, rank, world) for rank in range(world)]
    assert sorted(n for s in shares for n in s) == sorted(sizes)
    loads = [sum(sizes[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy largest-first: within one file
    shuffled = dict(sorted(sizes.items(), key=lambda kv: random.Random(world).random()))
    assert [manifest.share(shuffled, r, world) for r in range(world)] == shares  # the order of listing is moot


def test_sizes_catch_truncation_checksums_catch_garbage(tmp_path):
    step_dir = _step_dir(tmp_path)
    assert manifest.damage(step_dir) is None
    target = step_dir / "file_1.bin"
    _garble(target)
    assert manifest.damage(step_dir, hashes=False) is None
    assert manifest.damage(step_dir) == "file_1.bin does not match its checksum"
    owner = next(r for r in range(3) if "file_1.bin" in manifest.share(manifest.sizes_of(step_dir), r, 3))
    assert [manifest.damage(step_dir, r, 3) is not None for r in range(3)] == [r == owner for r in range(3)]
    target.write_bytes(target.read_bytes()[:100])
    assert manifest.damage(step_dir, hashes=False) == "file_1.bin has 100 bytes, the manifest says 5000"
    (step_dir / manifest.MANIFEST).write_text('{"files": [1, 2]}')
    assert manifest.damage(step_dir) == "manifest.json is unreadable"


def _write_and_verify(rank, world, root):
    """Each rank hashes only its share (recorded), the manifest matches one written by a single process,
    and a garbled file is reported by every rank."""
    step_dir, reference = Path(root) / "checkpoints" / "step_4", Path(root) / "single.json"
    read = []
    original = manifest.sha256
    manifest.sha256 = lambda path: read.append(str(path.relative_to(step_dir))) or original(path)
    mine = manifest.share(manifest.sizes_of(step_dir), rank, world)  # (listed before rank 0 writes the manifest)
    manifest.write(step_dir, rank, world)
    assert read == mine
    shares = gather_objects(read)
    assert sorted(n for s in shares for n in s) == sorted(manifest.sizes_of(step_dir))
    if rank == 0:
        assert json.loads((step_dir / manifest.MANIFEST).read_text()) == json.loads(reference.read_text())
    gather_objects(None)  # rank 0 compared before anyone garbles
    if rank == world - 1:
        _garble(step_dir / "state" / "file_0.bin")
    gather_objects(None)
    assert manifest.damage_together(step_dir, rank, world) == "state/file_0.bin does not match its checksum"


def test_manifest_written_and_verified_over_ranks(tmp_path):
    step_dir = _step_dir(tmp_path)
    (tmp_path / "single.json").write_text((step_dir / manifest.MANIFEST).read_text())
    (step_dir / manifest.MANIFEST).unlink()
    run_ranks(_write_and_verify, 3, str(tmp_path))


def _settle(rank, world, root):
    run_dir = Path(root)
    found = checkpoint.find("auto", run_dir)
    assert found.tag == "step_6"  # sizes agree with its manifest: chosen before the process group
    settled = checkpoint.settle(found, rank, world)
    assert settled.tag == "step_2"
    assert settled.skipped == (
        "step_6: state/file_0.bin does not match its checksum",
        "step_4: file_1.bin has 10 bytes, the manifest says 5000",
    )
    gather_objects(None)
    if rank == 0:
        _garble(run_dir / "checkpoints" / "step_2" / "file_7.bin")
    gather_objects(None)
    with pytest.raises(BadInput, match=r"no usable checkpoint in .*step_2: file_7.bin does not match its checksum"):
        checkpoint.settle(found, rank, world)


def test_every_rank_settles_on_the_same_older_checkpoint(tmp_path):
    """The newest checkpoint's files have their sizes but one is garbage; the next is truncated: all
    ranks fall back to the oldest together, and when it fails too they all refuse with one reason."""
    for tag in ("step_2", "step_4", "step_6"):
        _step_dir(tmp_path, tag)
    _garble(tmp_path / "checkpoints" / "step_6" / "state" / "file_0.bin")
    truncated = tmp_path / "checkpoints" / "step_4" / "file_1.bin"
    truncated.write_bytes(truncated.read_bytes()[:10])
    run_ranks(_settle, 2, str(tmp_path))


def test_a_named_step_directory_with_garbage_is_refused(tmp_path):
    step_dir = _step_dir(tmp_path)
    _garble(step_dir / "file_2.bin")
    found = checkpoint.find(str(step_dir), tmp_path)
    assert found.step_dir == step_dir and found.older == ()
    with pytest.raises(BadInput, match=r"step_4 is damaged: file_2.bin does not match its checksum; pick another"):
        checkpoint.settle(found, 0, 1)
