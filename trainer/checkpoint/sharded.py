"""The layout-independent form of a checkpoint, written and read shard by shard with
``torch.distributed.checkpoint`` (DCP).

Why DCP: it writes each rank's slices of a tensor with their global shape and offsets (one file per
rank plus a ``.metadata`` index), reads back at any other sharding only the stored chunks a rank's
slices overlap, and the ecosystem reads it (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``
turns a part into one ``torch.save`` file). DeepSpeed's universal checkpoint would need DeepSpeed to
know how the project's own tensor-parallel layers split each parameter; DCP only needs the split.

Keys are the dense GPT's parameter names (``trainer.model.gpt.GPT``) under three prefixes:

    model.<name>        fp32 weights
    exp_avg.<name>      Adam's first moment   (absent before the optimizer's first step)
    exp_avg_sq.<name>   Adam's second moment

Every tensor is written with its global shape (the dense tensor's: tp shards side by side along the
layer's partition dim, Megatron's column / row / vocabulary-parallel split; replicated tensors once), each
rank writing whole rows of its tp shard as DCP chunks:

    under ZeRO  the rows whose first element its partition (a flat range of the shard) holds; the rest of
                its last such row comes from the next ranks' partitions (at most a row each, over dp)
    without     its torch.chunk share of the rows over dp
    ZeRO

so a rank writes about 1/(tp·dp) of its stage and nothing is gathered whole. The parameters go in parts of
at most ``PART_ELEMENTS`` elements each (``state/part_<k>/``, one DCP checkpoint per part, in parameter
order); a rank holds one part's copies at most (see ``_Rows``). A load reads only what the rank
keeps: under ZeRO the rows its partition covers, without ZeRO its tp shard; DCP reads any chunking back.
The last stage's copy of the tied embedding is not written (the first stage's is the same tensor: DeepSpeed
all-reduces their gradients).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint.consolidate import (
    MOMENTS,
    adam_step,
    local_shape,
    partitioned,
    read_span,
    relink_moments,
    span,
    to_layout,
)
from trainer.checkpoint.dcp_writer import LeanWriter
from trainer.parallel.dims import Mesh
from trainer.parallel.mappings import gather_objects

STATE_DIR = "state"  # the sharded state inside a step directory: one DCP checkpoint per part
PART_ELEMENTS = int(5e7)  # parameter elements per part (times 3 with both Adam moments), over a stage's ranks
CHUNK_ELEMENTS = 2**24  # elements per saved chunk at most (64 MiB in fp32), or one row where a row is longer
KINDS = ("model", *MOMENTS)


def key(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def part_dir(step_dir: Path, part: int) -> Path:
    return Path(step_dir) / STATE_DIR / f"part_{part:05d}"


def part_dirs(step_dir: Path) -> list[Path]:
    return sorted((Path(step_dir) / STATE_DIR).glob("part_*"))


def parts(named: list[tuple[str, nn.Parameter]], tp: int) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive parameters, each run at most PART_ELEMENTS elements (whole tensors; a larger tensor
    is a part of its own)."""
    out: list[list[tuple[str, nn.Parameter]]] = [[]]
    size = 0
    for name, param in named:
        n = tp_global_shape(local_shape(param), param, tp).numel()
        if out[-1] and size + n > PART_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append((name, param))
        size += n
    return out


# --- layout ------------------------------------------------------------------------------------------


def tp_global_shape(local: torch.Size, param: nn.Parameter, tp: int) -> torch.Size:
    """The whole tensor's shape from this rank's tp shard (Megatron's splits are even)."""
    if not getattr(param, "tensor_model_parallel", False):
        return torch.Size(local)
    shape = list(local)
    shape[param.partition_dim] *= tp
    return torch.Size(shape)


def _saved_here(name: str, mesh: Mesh) -> bool:
    """Every parameter but the last stage's copy of the tied embedding (position l+2)."""
    return not (name == "wte.weight" and mesh.coords.pp > 0)


def _part_count(named: list, mesh: Mesh) -> int:
    """The number of parts every rank takes part in: the most any stage has (collective)."""
    count = torch.tensor(len(parts(named, mesh.dims.tp)))
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


# --- saving ------------------------------------------------------------------------------------------


def save(engine, named: Iterable[tuple[str, nn.Parameter]], mesh: Mesh, step_dir: Path) -> None:
    """Write this rank's slices of weights and Adam moments, part by part; collective over the world.

    A rank writes whole rows of its tp shard of each tensor: under ZeRO those whose first element its
    partition holds (the rest of its last such row comes from the next ranks' partitions: at most a row
    each, exchanged over dp), without ZeRO its torch.chunk share of the rows over dp. Nothing is gathered
    whole."""
    import torch.distributed.checkpoint as dcp

    named = list(named)
    relink_moments(engine)
    kinds = KINDS if adam_step(engine) > 0 else ("model",)  # no moments before the optimizer's first step
    mine = parts(named, mesh.dims.tp)
    for k in range(_part_count(named, mesh)):
        rows = _part_rows(engine, mine[k] if k < len(mine) else [], mesh, kinds)
        path = str(part_dir(step_dir, k))
        dcp.save(rows, checkpoint_id=path, storage_writer=LeanWriter(path), planner=_rows_save_planner())
        del rows  # one part's exchanged pieces at a time


def _save_range(engine, param: nn.Parameter, mesh: Mesh) -> tuple[int, int]:
    """The flat range of the tp shard this rank writes from: its ZeRO partition, or without ZeRO (every dp
    rank holds it all) its torch.chunk share of the rows, so the dp ranks split the writing."""
    if partitioned(engine):
        return span(engine, param)
    shard = local_shape(param)
    rows = [len(piece) for piece in torch.empty(shard[0], 0).chunk(mesh.dims.dp, 0)]
    rows += [0] * (mesh.dims.dp - len(rows))
    first, row = sum(rows[: mesh.coords.dp]), shard[1:].numel()
    return first * row, (first + rows[mesh.coords.dp]) * row


@dataclass(frozen=True)
class _Rows:
    """The whole rows of a tensor that this rank writes: its own elements (a view of what it holds) and the
    following ranks' leading pieces that complete its last row, joined only when DCP writes them. The writer
    (``dcp_writer.LeanWriter``) copies a view of a larger buffer before writing it and drops the copy once
    written: a save holds one chunk's copy at a time."""

    own: torch.Tensor
    tail: tuple[torch.Tensor, ...]
    shape: torch.Size  # the rows' shape
    offsets: torch.Size  # where they lie in the saved tensor
    size: torch.Size  # the saved tensor's (dense) shape

    def tensor(self) -> torch.Tensor:
        return (torch.cat([self.own, *self.tail]) if self.tail else self.own).view(self.shape)

    def split(self, limit: int) -> list[_Rows]:
        """Runs of whole rows of at most ``limit`` elements (at least a row each): what DCP keeps of a tensor
        while writing, and what it reads whole before narrowing it on a load."""
        row = self.shape[1:].numel()
        step = max(1, limit // row)
        out = []
        for first in range(0, self.shape[0], step):
            last = min(first + step, self.shape[0])
            tail = self.tail if last * row > self.own.numel() else ()  # the pieces complete the last row only
            offsets = torch.Size([self.offsets[0] + first, *self.offsets[1:]])
            shape = torch.Size([last - first, *self.shape[1:]])
            out.append(_Rows(self.own[first * row : last * row], tail, shape, offsets, self.size))
        return out


def _part_rows(engine, named: list, mesh: Mesh, kinds) -> dict[str, list[_Rows]]:
    """{key: this rank's rows, in chunks of at most ``CHUNK_ELEMENTS``} for one part; collective over dp
    (each rank's leading piece of a row that an earlier rank writes goes to that rank)."""
    ranges, values, pieces = {}, {}, {}
    for name, param in named:
        if not _saved_here(name, mesh):
            continue
        start, stop = _save_range(engine, param, mesh)
        row = local_shape(param)[1:].numel()
        lead = min(stop, -(-start // row) * row) - start  # elements before this rank's first whole row
        for kind in kinds:
            fqn = key(kind, name)
            value = read_span(engine, param, None if kind == "model" else kind)
            if not partitioned(engine):
                value = value[start:stop]
            ranges[fqn], values[fqn] = (start, stop, param), value[lead:]
            if lead:
                pieces[fqn] = (start, value[:lead].to("cpu", copy=True))
    # Less than a row per tensor and rank, on the CPU: a pickled CUDA tensor unpickles on the sender's device.
    everyone = gather_objects(pieces, group=mesh.dp_group)
    return {
        fqn: _rows(fqn, *ranges[fqn], values[fqn], everyone, mesh).split(CHUNK_ELEMENTS)
        for fqn in ranges
        if values[fqn].numel()
    }


def _rows(fqn: str, start: int, stop: int, param: nn.Parameter, own: torch.Tensor, everyone: list, mesh: Mesh):
    """This rank's whole rows of ``fqn``: its own elements, then the following ranks' leading pieces up to
    the row's end."""
    shard = local_shape(param)
    row = shard[1:].numel()
    first, end = -(-start // row), -(-stop // row) * row
    tail = sorted((p[fqn] for p in everyone if fqn in p and stop <= p[fqn][0] < end), key=lambda piece: piece[0])
    tail = tuple(piece.to(own.device) for _, piece in tail)
    count = own.numel() + sum(piece.numel() for piece in tail)
    assert count == end - first * row, (fqn, start, stop, count)
    offsets = [0] * len(shard)
    if getattr(param, "tensor_model_parallel", False):
        offsets[param.partition_dim] = mesh.coords.tp * shard[param.partition_dim]
    offsets[0] += first
    shape = torch.Size([count // row, *shard[1:]])
    return _Rows(own, tail, shape, torch.Size(offsets), tp_global_shape(shard, param, mesh.dims.tp))


def _rows_save_planner():
    """DCP's default save planner over a state of ``_Rows`` lists: each is written as a chunk at its offsets in a
    tensor of its dense shape (DCP's metadata then lists every rank's rows as chunks), and joined only when
    the writer asks for it."""
    from torch.distributed.checkpoint import DefaultSavePlanner, SavePlan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class RowsSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items, self.rows = [], {}
            for fqn, chunks in self.state_dict.items():
                for rows in chunks:
                    chunk = ChunkStorageMetadata(offsets=rows.offsets, sizes=rows.shape)
                    properties = TensorProperties.create_from_tensor(rows.own)
                    data = TensorWriteData(chunk=chunk, properties=properties, size=rows.size)
                    items.append(WriteItem(MetadataIndex(fqn, rows.offsets), WriteItemType.SHARD, tensor_data=data))
                    self.rows[fqn, tuple(rows.offsets)] = rows
            self.plan = SavePlan(items)
            return self.plan

        def lookup_object(self, index):  # the default looks offsets up in ShardedTensors only
            return self.rows[index.fqn, tuple(index.offset)].tensor()

    return RowsSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def rank_file_bytes(step_dir: Path, rank: int) -> int:
    """Bytes of the sharded state that ``rank`` wrote (DCP names its files ``__<rank>_0.distcp``)."""
    return sum(p.stat().st_size for p in (Path(step_dir) / STATE_DIR).glob(f"part_*/__{rank}_*.distcp"))


# --- loading -----------------------------------------------------------------------------------------


def saved_shapes(step_dir: Path) -> dict[str, tuple[int, torch.Size]]:
    """Every key of a step directory's sharded state: (its part, its global shape). Reads the indexes only."""
    from torch.distributed.checkpoint import FileSystemReader

    out = {}
    for k, path in enumerate(part_dirs(step_dir)):
        metadata = FileSystemReader(str(path)).read_metadata()
        for name, item in metadata.state_dict_metadata.items():
            if hasattr(item, "size"):
                out[name] = (k, torch.Size(item.size))
    return out


def load_parts(named: list[tuple[str, nn.Parameter]], mesh: Mesh, step_dir: Path, kinds, span_of) -> Iterator:
    """Read this rank's share part by part (collective over the world per part) and yield, for each of
    its parameters, ``(name, param, {kind: values})``: the flat range ``span_of(param)`` of this rank's tp
    shard of each saved tensor (its ZeRO partition, or the whole shard without ZeRO), read from the rows
    that range covers and nothing else. Where the saved shape is not this layout's (the embedding under
    another vocabulary padding) the whole tensor is read and cut. The caller hands each parameter to the
    engine before the next part is read."""
    import torch.distributed.checkpoint as dcp

    saved = saved_shapes(step_dir)
    by_part: dict[int, list] = {}
    for name, param in named:
        by_part.setdefault(saved[key("model", name)][0], []).append((name, param))
    for k, path in enumerate(part_dirs(step_dir)):
        regions = {
            key(kind, name): _Region.of(param, saved[key(kind, name)][1], span_of(param), mesh)
            for name, param in by_part.get(k, [])
            for kind in kinds
        }
        state = {fqn: torch.empty(region.shape) for fqn, region in regions.items() if region.count}
        planner = _region_planner({fqn: regions[fqn].offsets for fqn in state})
        dcp.load(state, checkpoint_id=str(path), planner=planner)  # every rank, every part: collective
        for name, param in by_part.get(k, []):
            cut = {kind: _cut(state.pop(key(kind, name), None), regions[key(kind, name)], name, param, mesh)
                   for kind in kinds}  # fmt: skip
            yield name, param, cut
        del state  # before the next part is read


@dataclass(frozen=True)
class _Region:
    """The block of a saved tensor to read for a flat range of this rank's tp shard: whole rows of the
    shard (``offsets``, ``shape`` in the saved tensor), of which ``count`` elements from ``skip`` are wanted;
    or, ``whole``, the saved tensor entire (another shape than this layout's), cut to the range after."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    skip: int
    count: int
    whole: bool

    @classmethod
    def of(cls, param: nn.Parameter, saved: torch.Size, span: tuple[int, int], mesh: Mesh) -> _Region:
        start, stop = span
        shard = local_shape(param)
        if saved != tp_global_shape(shard, param, mesh.dims.tp):
            return cls((0,) * len(saved), tuple(saved), start, stop - start, whole=True)
        row = shard[1:].numel()
        first, last = start // row, -(-stop // row)
        offsets = [0] * len(shard)
        if getattr(param, "tensor_model_parallel", False):
            offsets[param.partition_dim] = mesh.coords.tp * shard[param.partition_dim]
        offsets[0] += first
        return cls(tuple(offsets), (last - first, *shard[1:]), start - first * row, stop - start, whole=False)


def _cut(block: torch.Tensor | None, region: _Region, name: str, param: nn.Parameter, mesh: Mesh) -> torch.Tensor:
    if block is None:  # nothing of this tensor is this rank's
        return torch.empty(0)
    if region.whole:
        block = to_layout(block, name, param, mesh.tp_group)
    return block.flatten().narrow(0, region.skip, region.count)


def _region_planner(offsets: dict[str, tuple[int, ...]]):
    """DCP's default load planner, except that each plain tensor of the state is the block at ``offsets``
    of the saved tensor rather than the whole of it (a rank's ZeRO partition is a flat range, which no
    DTensor placement expresses). Defined on call: importing DCP takes most of a second."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, block in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=block.size())
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):  # the block itself: the default looks offsets up in ShardedTensors only
            return self.state_dict[index.fqn]

    return RegionPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


# --- whole tensors, one at a time, without a process group (export, import, tests) -------------------


def tensor_names(step_dir: Path, kind: str = "model") -> list[str]:
    """The parameter names saved under ``kind`` (model, exp_avg or exp_avg_sq), in saved order."""
    prefix = f"{kind}."
    return [k[len(prefix) :] for k in saved_shapes(step_dir) if k.startswith(prefix)]


def read_tensor(step_dir: Path, kind: str, name: str) -> torch.Tensor:
    """One saved tensor, whole (reads only its chunks)."""
    import torch.distributed.checkpoint as dcp

    part, shape = saved_shapes(step_dir)[key(kind, name)]
    state = {key(kind, name): torch.empty(shape)}
    with _one_process():
        dcp.load(state, checkpoint_id=str(part_dir(step_dir, part)), no_dist=True)
    return state[key(kind, name)]


def read_tensors(step_dir: Path, kind: str = "model") -> dict[str, torch.Tensor]:
    """Every saved tensor of ``kind``, whole: for small models (tests, checks); tools stream with
    ``read_tensor``."""
    return {name: read_tensor(step_dir, kind, name) for name in tensor_names(step_dir, kind)}


def write_tensors(step_dir: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """{kind: {name: whole tensor}} as a one-process sharded state (tests, small models)."""
    write_stream(step_dir, ((kind, name, lambda t=t: t) for kind, ts in tensors.items() for name, t in ts.items()))


def write_stream(step_dir: Path, items: Iterable) -> int:
    """A one-process sharded state from ``(kind, name, produce)`` items, each tensor produced only when
    its part is written (at most PART_ELEMENTS parameters held at once). Returns the parameter count."""
    import torch.distributed.checkpoint as dcp

    part: dict[str, torch.Tensor] = {}
    count, written = 0, 0

    def flush() -> None:
        nonlocal part, written
        with _one_process():
            dcp.save(part, checkpoint_id=str(part_dir(step_dir, written)), no_dist=True)
        part, written = {}, written + 1

    for kind, name, produce in items:
        tensor = produce().detach().float().contiguous()
        if part and sum(t.numel() for t in part.values()) + tensor.numel() > PART_ELEMENTS:
            flush()
        part[key(kind, name)] = tensor
        count += tensor.numel() if kind == "model" else 0
    if part or not written:
        flush()
    return count


@contextmanager
def _one_process():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield
