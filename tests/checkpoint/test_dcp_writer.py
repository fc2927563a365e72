"""``LeanWriter`` writes the files torch's ``FileSystemWriter`` writes, and holds one resolved tensor at a time where
torch's writer keeps every one until the rank's file is closed."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType

from trainer.checkpoint.dcp_writer import LeanWriter


class FreshCopies(DefaultSavePlanner):
    """Resolves every tensor to a fresh copy (as the sharded save joins a rank's rows) and counts, at each
    resolution, how many of the earlier copies are still alive."""

    def __init__(self):
        super().__init__()
        self.copies, self.alive = [], []

    def resolve_data(self, item):
        data = super().resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            return data
        self.alive.append(sum(ref() is not None for ref in self.copies))
        # A tensor over a numpy array keeps the array alive as long as any view of its storage lives (the
        # writer's detached or moved aliases included): the array's weak reference follows the storage
        array = data.numpy().copy()
        self.copies.append(weakref.ref(array))
        return torch.from_numpy(array)


def _state() -> dict:
    """Views of one larger buffer (a ZeRO-1 flat partition's shape of things), and a plain object."""
    flat = torch.arange(4000, dtype=torch.float32)
    return {"a": flat[:1000].view(10, 100), "b": flat[1000:3000], "c": flat[3000:].view(-1, 10), "step": 7}


def _save(state, path, writer_type, planner=None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.save(state, storage_writer=writer_type(str(path)), planner=planner, no_dist=True)


@pytest.mark.parametrize("writer_type, most_alive", [(FileSystemWriter, 2), (LeanWriter, 0)])
def test_copies_are_dropped_once_written(tmp_path, writer_type, most_alive):
    planner = FreshCopies()
    _save(_state(), tmp_path, writer_type, planner)
    assert planner.alive == ([0, 1, 2] if most_alive else [0, 0, 0])


def test_the_files_are_torchs(tmp_path):
    _save(_state(), tmp_path / "torch", FileSystemWriter)
    _save(_state(), tmp_path / "lean", LeanWriter)
    data = sorted(p.name for p in (tmp_path / "torch").glob("*.distcp"))
    assert data == sorted(p.name for p in (tmp_path / "lean").glob("*.distcp")) and data
    for name in data:
        assert (tmp_path / "torch" / name).read_bytes() == (tmp_path / "lean" / name).read_bytes()
    back = {"a": torch.zeros(10, 100), "b": torch.zeros(2000), "c": torch.zeros(100, 10), "step": 0}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.load(back, checkpoint_id=str(tmp_path / "lean"), planner=DefaultLoadPlanner(), no_dist=True)
    want = _state()
    assert back["step"] == 7 and all(torch.equal(back[k], want[k]) for k in "abc")
