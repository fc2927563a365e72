"""Megatron's indexed data set (``<prefix>.bin`` + ``<prefix>.idx``), read and written, so corpora made by
Megatron-LM's or GPT-NeoX's ``preprocess_data.py`` train here as they are, and ours train there.

The format (megatron.core.datasets.indexed_dataset, "MMIDIDX" version 1), all little-endian:

- ``<prefix>.bin``: the token ids of every sequence, back to back, in one integer dtype; nothing else.
- ``<prefix>.idx``: the 9-byte magic ``MMIDIDX\\0\\0``, the version (uint64, 1), the dtype code (uint8:
  1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), the sequence count S
  (uint64), the document-index count D (uint64), then S sequence lengths in tokens (int32), S byte
  offsets of the sequences in ``.bin`` (int64) and D document indices (int64): document ``d`` is the
  sequences ``[doc[d], doc[d+1])``, so ``doc[0] = 0``, ``doc[-1] = S`` and there are D - 1 documents. A
  multimodal file adds S int8 modes; they are not read.

Training cuts samples as from the project's own token files (``trainer.data.stream``): the documents'
tokens concatenated as stored, in file order, windows of ``seq_len + 1`` tokens across document
boundaries, nothing inserted. Megatron corpora made with ``--append-eod`` already end every document with
the tokenizer's end-of-document token (``<|endoftext|>`` for GPT-2 style tokenizers, the project's EOT),
which is exactly the project's separation; a corpus made without it trains with its documents abutting
(as Megatron's GPTDataset does); ``prepare_megatron`` says how many documents end with the EOT.

Our writer stores one sequence per document. Export a corpus prepared by this project::

    python -m trainer.data.indexed export <prepared directory> <out prefix>   # <out>_train/_val .bin/.idx
    python -m trainer.data.indexed info <prefix>                               # counts, dtype, max id
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.prepare import PreparedData
from trainer.data.stream import TokenFile

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}
CODES = {name: code for code, name in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
_CHUNK = 1 << 20  # elements per read/write of index arrays and token scans: bounded memory


def megatron_dtype(vocab_size: int) -> str:
    """The dtype Megatron's preprocess script picks for a vocabulary: uint16 below 65500, else int32."""
    return "uint16" if vocab_size < 65500 else "int32"


def paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(<prefix>.bin, <prefix>.idx)``; a prefix given with either suffix is accepted."""
    prefix = str(prefix)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


@dataclass(frozen=True)
class Header:
    dtype: str
    sequences: int
    documents: int  # D - 1
    offset: int  # where the sequence lengths start in .idx


def read_header(prefix: str | Path) -> Header:
    """The ``.idx`` header, checked; a missing file, wrong magic/version or dtype is a ValueError."""
    bin_path, idx_path = paths(prefix)
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise ValueError(f"{path}: no such file (a Megatron data set is <prefix>.bin + <prefix>.idx)")
    with idx_path.open("rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size or raw[:9] != MAGIC:
        raise ValueError(f"{idx_path}: not a Megatron indexed data set (no MMIDIDX header)")
    _, version, code, sequences, doc_count = _HEADER.unpack(raw)
    if version != VERSION:
        raise ValueError(f"{idx_path}: format version {version}; only version {VERSION} is read")
    if code not in DTYPES or DTYPES[code].startswith("float"):
        raise ValueError(f"{idx_path}: dtype code {code} is not an integer token dtype ({sorted(CODES)})")
    if doc_count < 1:
        raise ValueError(f"{idx_path}: no document index")
    return Header(DTYPES[code], sequences, doc_count - 1, _HEADER.size)


class IndexedReader:
    """A Megatron data set, memory-mapped: ``tokens`` is the flat token array of ``.bin`` (no copy),
    ``document(i)`` a document's tokens, ``doc_starts[i]`` where document i starts in ``tokens``."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = paths(prefix)
        header = read_header(prefix)
        self.dtype, self.num_sequences, self.num_documents = header.dtype, header.sequences, header.documents
        itemsize = np.dtype(self.dtype).itemsize
        s, d = self.num_sequences, self.num_documents + 1
        needed = header.offset + s * 4 + s * 8 + d * 8
        if self.idx_path.stat().st_size < needed:
            raise ValueError(f"{self.idx_path}: truncated ({self.idx_path.stat().st_size} bytes, needs {needed})")
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        at = header.offset
        self.sequence_lengths = index[at : at + 4 * s].view(np.int32)
        self.sequence_pointers = index[at + 4 * s : at + 12 * s].view(np.int64)
        self.document_indices = index[at + 12 * s : at + 12 * s + 8 * d].view(np.int64)
        # The flat view needs the sequences back to back from byte 0, as every Megatron writer stores them.
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * itemsize
        if s and (self.sequence_pointers[0] != 0 or not np.array_equal(self.sequence_pointers[1:], ends[:-1])):
            raise ValueError(f"{self.idx_path}: sequences are not stored back to back in {self.bin_path.name}")
        total = int(ends[-1]) if s else 0
        if self.bin_path.stat().st_size != total:
            raise ValueError(
                f"{self.bin_path}: {self.bin_path.stat().st_size} bytes, but the index describes {total} "
                f"({total // itemsize} {self.dtype} tokens); wrong dtype, truncated or not this index's .bin"
            )
        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != s or np.any(np.diff(docs) < 0):
            raise ValueError(f"{self.idx_path}: document indices are not 0 .. {s} ascending")
        starts = np.append(self.sequence_pointers // itemsize, total // itemsize)
        self.doc_starts = starts[docs]  # token offsets, num_documents + 1 of them
        self.num_tokens = total // itemsize
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if total else np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]]

    def __iter__(self):
        return (self.document(i) for i in range(self.num_documents))

    def max_token(self, start: int = 0, stop: int | None = None) -> int:
        """The largest token id in ``tokens[start:stop]`` (-1 if empty), read in bounded chunks."""
        stop = self.num_tokens if stop is None else stop
        best = -1
        for at in range(start, stop, 16 * _CHUNK):
            best = max(best, int(self.tokens[at : min(stop, at + 16 * _CHUNK)].max()))
        return best

    def ends_with(self, token: int, first: int = 0, last: int | None = None) -> int:
        """How many of documents ``[first, last)`` end with ``token``."""
        last = self.num_documents if last is None else last
        starts, ends = self.doc_starts[first:last], self.doc_starts[first + 1 : last + 1]
        ends = ends[ends > starts]  # empty documents end with nothing
        return int(np.count_nonzero(self.tokens[ends - 1] == token)) if len(ends) else 0


class IndexedWriter:
    """Write a Megatron data set one document at a time (one sequence per document).

    Tokens go straight to ``.bin``; sequence lengths are spooled to a temporary file, so memory stays
    bounded for any corpus size. ``close()`` writes ``.idx``; both files appear under their names only
    then. Use as a context manager; an exception removes the partial files.
    """

    def __init__(self, prefix: str | Path, dtype: str):
        if dtype not in CODES or dtype.startswith("float"):
            raise ValueError(f"dtype {dtype!r}: use an integer dtype Megatron knows ({', '.join(sorted(CODES))})")
        self.bin_path, self.idx_path = paths(prefix)
        self.dtype = np.dtype(dtype)
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._len_tmp = self.idx_path.with_name(self.idx_path.name + ".lengths.tmp")
        self._bin = self._bin_tmp.open("wb")
        self._lengths_file = self._len_tmp.open("wb")
        self._lengths: list[int] = []
        self.documents = self.tokens = 0
        self._limit = np.iinfo(self.dtype)

    def add_document(self, tokens) -> None:
        array = np.asarray(tokens)
        if array.size and (
            not np.issubdtype(array.dtype, np.integer) or array.min() < self._limit.min or array.max() > self._limit.max
        ):
            raise ValueError(f"document {self.documents}: token ids do not fit {self.dtype.name}")
        if array.size > np.iinfo(np.int32).max:
            raise ValueError(f"document {self.documents}: {array.size} tokens; Megatron lengths are int32")
        array.astype(self.dtype, copy=False).tofile(self._bin)
        self._lengths.append(array.size)
        self.documents += 1
        self.tokens += array.size
        if len(self._lengths) >= _CHUNK:
            self._spool()

    def _spool(self) -> None:
        np.asarray(self._lengths, dtype=np.int32).tofile(self._lengths_file)
        self._lengths = []

    def close(self) -> None:
        self._spool()
        self._bin.close()
        self._lengths_file.close()
        s, itemsize = self.documents, self.dtype.itemsize
        idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        with idx_tmp.open("wb") as out:
            out.write(_HEADER.pack(MAGIC, VERSION, CODES[self.dtype.name], s, s + 1))
            lengths = np.memmap(self._len_tmp, dtype=np.int32, mode="r") if s else np.empty(0, np.int32)
            for at in range(0, s, _CHUNK):
                lengths[at : at + _CHUNK].tofile(out)
            pointer = 0
            for at in range(0, s, _CHUNK):  # byte offsets: a running sum of the lengths
                chunk = lengths[at : at + _CHUNK].astype(np.int64) * itemsize
                (np.cumsum(chunk) - chunk + pointer).tofile(out)
                pointer += int(chunk.sum())
            for at in range(0, s + 1, _CHUNK):  # one sequence per document
                np.arange(at, min(s + 1, at + _CHUNK), dtype=np.int64).tofile(out)
            del lengths
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)
        self._len_tmp.unlink()

    def abort(self) -> None:
        self._bin.close()
        self._lengths_file.close()
        for path in (self._bin_tmp, self._len_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        self.abort() if kind is not None else self.close()


# --- training from Megatron files ------------------------------------------------------------------


class TokenRange(TokenFile):
    """``TokenFile`` over tokens ``[start, stop)`` of a ``.bin`` (a memory map of that range, no copy)."""

    def __init__(self, path: str | Path, dtype: str, start: int, stop: int):
        self.path = Path(path)
        if stop <= start:
            raise ValueError(f"data: no tokens in {self.path}[{start}:{stop}]")
        itemsize = np.dtype(dtype).itemsize
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=start * itemsize, shape=stop - start)


@dataclass(frozen=True)
class MegatronData(PreparedData):
    """A Megatron corpus read in place: each split is a token range of a ``.bin`` (``token_file``)."""

    train_range: tuple[int, int] = (0, 0)
    val_range: tuple[int, int] = (0, 0)

    def token_file(self, split: str) -> TokenFile:
        if split == "train":
            return TokenRange(self.train_path, self.dtype, *self.train_range)
        return TokenRange(self.val_path, self.dtype, *self.val_range)


def prepare_megatron(cfg, log=print) -> MegatronData:
    """``data.source=megatron`` (``cfg`` a DataConfig): the files as they are, their tokenizer, and the
    validation split: ``data.megatron.val_prefix``, or else the last ``data.val_fraction`` of the train
    files' documents (at least one). A token id beyond the tokenizer is a ValueError."""
    from trainer.data.tokenizer import EOT, load_tokenizer

    m = cfg.megatron
    if cfg.tokenizer.source == "train":
        raise ValueError("data.source=megatron needs data.tokenizer.source: the tokenizer the files were made with")
    train = IndexedReader(m.train_prefix)
    if m.val_prefix:
        val = IndexedReader(m.val_prefix)
        if val.dtype != train.dtype:
            raise ValueError(f"data.megatron.val_prefix: dtype {val.dtype}, but the train files' is {train.dtype}")
        train_docs, val_docs = (0, train.num_documents), (0, val.num_documents)
    else:
        if train.num_documents < 2:
            raise ValueError(f"{train.idx_path}: {train.num_documents} document(s); a validation split needs 2")
        held = max(1, round(train.num_documents * cfg.val_fraction))
        val = train
        train_docs, val_docs = (0, train.num_documents - held), (train.num_documents - held, train.num_documents)
    train_range = (int(train.doc_starts[train_docs[0]]), int(train.doc_starts[train_docs[1]]))
    val_range = (int(val.doc_starts[val_docs[0]]), int(val.doc_starts[val_docs[1]]))

    tok = load_tokenizer(cfg.tokenizer.source)
    vocab = tok.get_vocab_size()
    eot_token = getattr(cfg.tokenizer, "eot", EOT)
    eot = tok.token_to_id(eot_token)
    if eot is None:
        raise ValueError(
            f"the tokenizer {cfg.tokenizer.source} has no {eot_token} token; set data.tokenizer.eot "
            "to its end-of-document token"
        )
    tok_file = Path(cfg.tokenizer.source)
    tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for r in {train, val} for p in (r.bin_path,)]
    key = {"files": sorted(stats), "tokenizer": hashlib.sha256(tok_file.read_bytes()).hexdigest()}
    directory = Path(cfg.cache_dir) / f"megatron-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("key") != key:  # the scan for the largest id reads every token once; remember it
        meta = {"key": key, "max_token": max(train.max_token(), val.max_token() if val is not train else -1)}
        _copy_tokenizer(Path(cfg.tokenizer.source), directory / "tokenizer")
        meta_path.write_text(json.dumps(meta, indent=2))
    if meta["max_token"] >= vocab:
        raise ValueError(
            f"the Megatron files hold token id {meta['max_token']}, but the tokenizer {cfg.tokenizer.source} has "
            f"only {vocab} tokens; give the tokenizer the files were made with"
        )
    ending = train.ends_with(eot, *train_docs)
    log(f"data: {ending:,} of {train_docs[1] - train_docs[0]:,} train documents end with {eot_token} (id {eot})")
    prepared = MegatronData(
        directory=directory,
        train_path=train.bin_path,
        val_path=val.bin_path,
        tokenizer_dir=directory / "tokenizer",
        vocab_size=vocab,
        eot_id=eot,
        dtype=train.dtype,
        train_tokens=train_range[1] - train_range[0],
        val_tokens=val_range[1] - val_range[0],
        train_range=train_range,
        val_range=val_range,
    )
    log(
        f"data: Megatron {train.bin_path.name}: {prepared.train_tokens:,} train + {prepared.val_tokens:,} val "
        f"{train.dtype} tokens, read in place"
    )
    return prepared


def _copy_tokenizer(source: Path, directory: Path) -> None:
    """The tokenizer as given (an HF directory's files, or tokenizer.json), for checkpoints and samples."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, directory, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, directory / "tokenizer.json")


# --- export -----------------------------------------------------------------------------------------


def export_prepared(directory: str | Path, prefix: str | Path) -> dict[str, Path]:
    """Write a corpus prepared by this project (``train.bin``/``.idx``, ``val.bin``/``.idx``, ``meta.json``)
    as Megatron data sets ``<prefix>_train`` and ``<prefix>_val``: one document per sequence, each ending
    with its EOT as prepared; dtype uint16 below 65500 tokens of vocabulary, else int32."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = megatron_dtype(meta["vocab_size"])
    written = {}
    for split in ("train", "val"):
        tokens = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
        starts = np.fromfile(directory / f"{split}.idx", dtype=np.int64)
        bounds = np.append(starts, len(tokens))
        out = Path(f"{prefix}_{split}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with IndexedWriter(out, dtype) as writer:
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                writer.add_document(tokens[a:b])
        written[split] = out
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.indexed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a prepared corpus directory as Megatron <prefix>_train/_val")
    export.add_argument("directory", help="the prepared directory (python -m trainer.prepare prints it)")
    export.add_argument("prefix", help="output prefix: <prefix>_train.bin/.idx and <prefix>_val.bin/.idx")
    info = sub.add_parser("info", help="documents, tokens, dtype and largest token id of a Megatron data set")
    info.add_argument("prefix")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if not (Path(args.directory) / "meta.json").is_file():
                raise ValueError(f"{args.directory}: no meta.json; give a directory python -m trainer.prepare made")
            for split, out in export_prepared(args.directory, args.prefix).items():
                reader = IndexedReader(out)
                counts = f"{reader.num_documents:,} documents, {reader.num_tokens:,} {reader.dtype} tokens"
                print(f"{split}: {counts} -> {out}")
        else:
            reader = IndexedReader(args.prefix)
            print(
                f"{reader.num_documents:,} documents, {reader.num_sequences:,} sequences, {reader.num_tokens:,} "
                f"{reader.dtype} tokens, largest id {reader.max_token()}"
            )
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
