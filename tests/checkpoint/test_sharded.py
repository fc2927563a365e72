"""The sharded layout-independent state (trainer.checkpoint.sharded) on 4 gloo ranks: written at one
tp·pp·dp layout, read back at others — every rank gets exactly its slices of the dense tensors, the
embedding re-padded for another tp — and a converter of the ecosystem (DCP's dcp_to_torch_save) reads it."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch
from parallel.spawn import run_ranks
from torch import nn

from trainer.checkpoint import consolidate, sharded
from trainer.parallel.dims import ParallelDims, build_mesh

H, V_SAVED = 8, 10  # 10 vocabulary rows: padded for tp2, re-padded to 12 for tp4
# name -> (full shape, tp partition dim or None, pipeline stage at pp2)
PARAMS = {
    "wte.weight": ((V_SAVED, H), 0, 0),
    "wpe.weight": ((5, H), None, 0),
    "blocks.0.attn.qkv.weight": ((3 * H, H), 0, 0),
    "blocks.0.attn.proj.weight": ((H, H), 1, 0),
    "blocks.1.mlp.fc1.weight": ((4 * H, H), 0, 1),
    "blocks.1.mlp.fc2.bias": ((H,), None, 1),
    "ln_f.weight": ((H,), None, 1),
}
pytestmark = pytest.mark.multiproc


def _full(name: str, kind: str, rows: int | None = None) -> torch.Tensor:
    shape, _, _ = PARAMS[name]
    base = {"model": 0.0, "exp_avg": 1000.0, "exp_avg_sq": 2000.0}[kind]
    full = (
        base
        + torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        + zlib.crc32(name.encode()) % 97
    )
    if rows is not None and rows > full.shape[0]:  # another padding: the new rows start at zero
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return full


def _params(mesh, vocab_rows: int) -> list[tuple[str, nn.Parameter]]:
    """This rank's shards, as the trainer's layers hold them (tied embedding on both end stages)."""
    tp, tp_rank, pp, stage = mesh.dims.tp, mesh.coords.tp, mesh.dims.pp, mesh.coords.pp
    out = []
    for name, (_, dim, owner) in PARAMS.items():
        on_stage = owner == stage or pp == 1 or (name == "wte.weight" and stage == pp - 1)
        if not on_stage:
            continue
        full = _full(name, "model", vocab_rows if name == "wte.weight" else None)
        param = nn.Parameter(full.chunk(tp, dim)[tp_rank].clone() if dim is not None else full.clone())
        if dim is not None:
            param.tensor_model_parallel, param.partition_dim = True, dim
        out.append((name, param))
    return out


def _engine(named, mesh) -> SimpleNamespace:
    """What the sharded state reads of a ZeRO-0 engine: its device and Adam's state (the dense moments cut
    like the weights)."""
    state = {param: {"step": torch.tensor(3.0), **_moments(name, param, mesh)} for name, param in named}
    optimizer = SimpleNamespace(state=state)
    return SimpleNamespace(device=torch.device("cpu"), optimizer=optimizer, zero_optimization_stage=lambda: 0)


def _moments(name: str, param, mesh) -> dict:
    return {k: consolidate.to_layout(_full(name, k), name, param, mesh.tp_group) for k in ("exp_avg", "exp_avg_sq")}


def _zero1_engine(named, mesh) -> SimpleNamespace:
    """A ZeRO-1-like engine: each dp rank holds a flat fragment of every parameter's tp shard (DeepSpeed's
    ``_hp_mapping``), rank 0 the first third plus one element, so fragments end mid-row."""
    for name, param in named:
        n = param.numel()
        cut = n // 3 + 1
        start, stop = (0, cut) if mesh.coords.dp == 0 else (cut, n)
        values = {k: v.flatten() for k, v in _moments(name, param, mesh).items()}
        values[None] = param.detach().clone().flatten()
        param._hp_mapping = SimpleNamespace(
            lp_fragment_address=SimpleNamespace(start=start, numel=stop - start),
            get_hp_fragment=lambda key=None, values=values, start=start, stop=stop: values[key][start:stop],
        )
    base = SimpleNamespace(state={"flat": {"step": torch.tensor(3.0)}})
    optimizer = SimpleNamespace(optimizer=base, single_partition_of_fp32_groups=[])
    return SimpleNamespace(device=torch.device("cpu"), optimizer=optimizer, zero_optimization_stage=lambda: 1)


def _check_roundtrip(rank: int, world: int, path: str, zero1: bool = False, chunk: int | None = None) -> None:
    if chunk is not None:
        sharded.CHUNK_ELEMENTS = chunk
    saved_at = build_mesh(ParallelDims(world, tp=2, pp=1 if zero1 else 2))  # dp2 under ZeRO-1, else pp2
    named = _params(saved_at, V_SAVED)
    engine = (_zero1_engine if zero1 else _engine)(named, saved_at)
    sharded.save(engine, named, saved_at, path)
    for tp in (1, 4):  # dp4, then tp4: every rank reads its slices and gets the dense tensors' cut
        target = build_mesh(ParallelDims(world, tp=tp))
        rows = -(-V_SAVED // tp) * tp
        mine = _params(target, rows)
        for span in (_all, _middle):  # without ZeRO; a ZeRO-like flat range starting and ending mid-row
            got = {n: saved for n, _, saved in sharded.load_parts(mine, target, path, sharded.KINDS, span)}
            for name, param in mine:
                for kind in sharded.KINDS:
                    dense = _full(name, kind, rows if name == "wte.weight" else None)
                    start, stop = span(param)
                    expected = consolidate.to_layout(dense, name, param, target.tp_group).flatten()[start:stop]
                    assert torch.equal(got[name][kind], expected), (tp, span.__name__, name, kind)


def _all(param) -> tuple[int, int]:
    return 0, param.numel()


def _middle(param) -> tuple[int, int]:
    return param.numel() // 3 + 1, param.numel() * 2 // 3


CHUNK = 20  # elements: two rows of the matrices (8 wide) per saved chunk, a run of 20 of the vectors


@pytest.mark.parametrize(
    "zero1, chunk", [(False, None), (True, None), (True, CHUNK)], ids=["tp2-pp2", "tp2-dp2-zero1", "zero1-chunked"]
)
def test_written_at_one_layout_read_at_others(tmp_path, zero1, chunk):
    from torch.distributed.checkpoint import FileSystemReader

    run_ranks(_check_roundtrip, 4, str(tmp_path / "step"), zero1, chunk)
    chunks = [
        c.sizes
        for part in sharded.part_dirs(tmp_path / "step")
        for meta in FileSystemReader(part).read_metadata().state_dict_metadata.values()
        for c in meta.chunks
    ]
    largest = max(torch.Size(size).numel() for size in chunks)
    assert largest <= CHUNK if chunk else largest > CHUNK, chunks
    # every tensor once, whole, without a process group; the last stage's tied copy was not written twice
    assert sorted(sharded.tensor_names(tmp_path / "step")) == sorted(PARAMS)
    assert torch.equal(
        sharded.read_tensor(tmp_path / "step", "exp_avg", "blocks.0.attn.proj.weight"),
        _full("blocks.0.attn.proj.weight", "exp_avg"),
    )


def test_a_converter_of_the_ecosystem_reads_it(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_ranks(_check_roundtrip, 4, str(tmp_path / "step"))
    merged = {}
    for part in sharded.part_dirs(tmp_path / "step"):
        dcp_to_torch_save(part, part / "all.pt")
        merged.update(torch.load(part / "all.pt"))
    for name in PARAMS:
        for kind in sharded.KINDS:
            assert torch.equal(merged[sharded.key(kind, name)], _full(name, kind)), (name, kind)
