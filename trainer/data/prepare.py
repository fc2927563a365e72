"""Corpus -> tokenizer -> memory-mapped token files, cached under a hash of everything they depend on.

A prepared directory ``<cache_dir>/<name>-<hash>/`` holds:

- ``train.bin``, ``val.bin``: every document's token ids followed by EOT, concatenated (dtype in meta)
- ``train.idx``, ``val.idx``: int64 offset (in tokens) where each document starts, one per document
- ``tokenizer/``: ``tokenizer.json`` plus the files ``AutoTokenizer.from_pretrained`` needs
- ``meta.json``: dtype, vocab_size, eot_id, token and document counts, and the cache-key inputs

It is built in a temporary sibling directory and renamed into place in one step, so a crash never
leaves a directory under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from trainer.config.schema import DataConfig
from trainer.data.tokenizer import eot_id, load_tokenizer, save_tokenizer, train_bpe

FORMAT_VERSION = 1  # bump when the layout or the tokenization changes, to invalidate old caches
JSON_SUFFIXES = (".json", ".jsonl")
_TEST_DIR = re.compile(r"tests?|.*_test|test_.*")  # test, tests, idle_test, test_asyncio, ...
_PACKAGE_DIRS = {"site-packages", "dist-packages"}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # one or more blank (or whitespace-only) lines

Log = Callable[[str], None]


@dataclass(frozen=True)
class PreparedData:
    """Where a prepared corpus lives and what a trainer needs to read it."""

    directory: Path
    train_path: Path  # train.bin
    val_path: Path  # val.bin
    tokenizer_dir: Path  # AutoTokenizer.from_pretrained / load_tokenizer loads it
    vocab_size: int  # the tokenizer's, special tokens included; ids are < vocab_size
    eot_id: int
    dtype: str  # numpy dtype of the .bin files: uint16 or uint32
    train_tokens: int
    val_tokens: int


# ---------------------------------------------------------------------------------------------
# Documents


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the corpus' documents in a deterministic order (``cfg.max_documents`` > 0 truncates)."""
    sources = {"pystdlib": _stdlib_documents, "files": _file_documents, "hub": _hub_documents}
    if cfg.source not in sources:
        raise ValueError(f"data.source={cfg.source!r}: must be pystdlib, files or hub")
    docs = sources[cfg.source](cfg)
    return itertools.islice(docs, cfg.max_documents) if cfg.max_documents > 0 else docs


def stdlib_files() -> list[Path]:
    """This Python's standard-library ``.py`` files, without installed packages and test suites.

    Sorted by path relative to the stdlib root. Inside a venv ``stdlib`` still names the base install.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for parent, dirs, names in os.walk(root):
        # Pruning here keeps the walk from descending into site-packages at all.
        dirs[:] = [d for d in dirs if d not in _PACKAGE_DIRS and not _TEST_DIR.fullmatch(d)]
        files += [Path(parent, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _stdlib_documents(cfg: DataConfig) -> Iterator[str]:
    return map(_read_text, stdlib_files())


def _expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files named by ``paths``, directories expanded recursively (sorted, hidden entries skipped)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = (f for f in path.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(path)))
            files += sorted(found, key=lambda f: f.relative_to(path).as_posix())
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data.paths: {str(path)!r} does not exist; give existing files or directories")
    return files


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _file_documents(cfg: DataConfig) -> Iterator[str]:
    for path in _expand_paths(cfg.paths):
        if path.suffix in JSON_SUFFIXES:
            yield from _stream_texts("json", None, [str(path)], "train", cfg.text_field)
        else:
            yield from paragraphs(_read_text(path))


def paragraphs(text: str) -> list[str]:
    """Split plain text at blank lines, so one big file (tinyshakespeare) still gives many documents."""
    return [p for p in _PARAGRAPH_BREAK.split(text.rstrip("\n")) if p.strip()]


def _hub_documents(cfg: DataConfig) -> Iterator[str]:
    data_files = list(cfg.paths) or None
    return _stream_texts(cfg.hub_name, cfg.hub_config or None, data_files, cfg.hub_split, cfg.text_field)


def _stream_texts(
    name: str, config: str | None, data_files: list[str] | None, split: str, text_field: str
) -> Iterator[str]:
    """Stream ``text_field`` of each record of an HF data set (hub name or builder such as "json")."""
    from datasets import load_dataset  # heavy; the pystdlib and plain-text paths do not need it

    records = load_dataset(name, config, data_files=data_files, split=split, streaming=True)
    for record in records:
        if text_field not in record:
            raise ValueError(
                f"data.text_field={text_field!r}: {name} records have columns {sorted(record)}; "
                "set data.text_field to the one holding the text"
            )
        yield record[text_field] or ""


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Return (train, val): every k-th document (k = round(1/val_fraction)) goes to validation."""
    k = val_every(val_fraction)
    train = [doc for i, doc in enumerate(docs) if i % k != k - 1]
    return train, docs[k - 1 :: k]


def val_every(val_fraction: float) -> int:
    """k such that every k-th document is held out for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
    return max(2, round(1 / val_fraction))


# ---------------------------------------------------------------------------------------------
# Cache key


def cache_key(cfg: DataConfig) -> dict:
    """Every input that changes the prepared files, as a JSON-able dict (hashed into the directory name)."""
    key: dict = {
        "format": FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,  # BPE training and encoding may change between releases
        "source": cfg.source,
        "text_field": cfg.text_field,
        "max_documents": cfg.max_documents if cfg.max_documents > 0 else -1,
        "val_fraction": cfg.val_fraction,
        "tokenizer": _tokenizer_key(cfg),
    }
    if cfg.source == "pystdlib":
        key["python"] = sys.version
        key["files"] = _files_digest(stdlib_files())
    elif cfg.source == "files":
        key["paths"] = [str(Path(p).resolve()) for p in cfg.paths]
        key["files"] = _files_digest(_expand_paths(cfg.paths))
    else:
        key["hub"] = [cfg.hub_name, cfg.hub_config, cfg.hub_split, list(cfg.paths)]
        # Local data_files can change under the same names; remote ones are pinned by name only.
        key["files"] = _files_digest(Path(p) for p in cfg.paths if Path(p).is_file())
    return key


def _tokenizer_key(cfg: DataConfig) -> dict:
    source = cfg.tokenizer.source
    if source == "train":
        return {"source": "train", "vocab_size": cfg.tokenizer.vocab_size}
    path = Path(source)
    path = path / "tokenizer.json" if path.is_dir() else path
    content = path.read_bytes() if path.is_file() else b""
    return {"source": str(path.resolve()), "sha256": hashlib.sha256(content).hexdigest()}


def _files_digest(files: Iterable[Path]) -> str:
    """Hash of (path, size, mtime) of each file: changes when any file is edited, added or removed."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_directory(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"{cfg.name}-{_digest(cache_key(cfg))}"


# ---------------------------------------------------------------------------------------------
# Prepare


def prepare(cfg: DataConfig, log: Log = print) -> PreparedData:
    """Tokenize the corpus into ``<cache_dir>/<name>-<hash>/``, or reuse it if already there."""
    key = cache_key(cfg)
    directory = Path(cfg.cache_dir) / f"{cfg.name}-{_digest(key)}"
    cached = _load_cached(directory, key)
    if cached is not None:
        log(f"data: using cached {directory}")
        return cached
    started = time.perf_counter()
    with _quiet_datasets():
        train_docs, val_docs = _collect(cfg, log)
        tok = _tokenizer(cfg, train_docs, log)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            meta = _write(tmp, tok, {"train": train_docs, "val": val_docs}, key, cfg.num_proc)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
            _publish(tmp, directory, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"data: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"in {time.perf_counter() - started:.1f}s -> {directory}"
    )
    return _prepared(directory, meta)


def _collect(cfg: DataConfig, log: Log) -> tuple[list[str], list[str]]:
    docs = list(iter_documents(cfg))
    where = {"pystdlib": "the standard library", "files": cfg.paths, "hub": cfg.hub_name}[cfg.source]
    if not docs:
        raise ValueError(f"data.source={cfg.source!r}: no documents found in {where}; check data.paths / data.hub_name")
    nonempty = [doc for doc in docs if doc]
    if not nonempty:
        raise ValueError(
            f"data.text_field={cfg.text_field!r}: all {len(docs)} documents are empty; "
            "point it at the column holding the text"
        )
    train, val = split_documents(nonempty, cfg.val_fraction)
    if not val:
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction}: {len(nonempty)} documents are too few to hold any out "
            f"(every k-th goes to validation, k={val_every(cfg.val_fraction)}); add documents or raise it"
        )
    log(f"data: {len(nonempty):,} documents from {cfg.source} ({len(train):,} train, {len(val):,} val)")
    return train, val


def _tokenizer(cfg: DataConfig, train_docs: list[str], log: Log) -> Tokenizer:
    if cfg.tokenizer.source != "train":
        log(f"data: loading tokenizer {cfg.tokenizer.source}")
        return load_tokenizer(cfg.tokenizer.source)
    started = time.perf_counter()
    tok = train_bpe(train_docs, cfg.tokenizer.vocab_size)
    log(f"data: trained byte-level BPE, vocab {tok.get_vocab_size():,} in {time.perf_counter() - started:.1f}s")
    return tok


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _write(directory: Path, tok: Tokenizer, splits: dict[str, list[str]], key: dict, num_proc: int) -> dict:
    """Write tokens, document offsets, tokenizer and (last) meta.json; return the meta dict."""
    dtype = token_dtype(tok.get_vocab_size())
    meta: dict = {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id(tok),
    }
    for split, docs in splits.items():
        meta[f"{split}_tokens"] = _write_split(directory, split, tok, docs, dtype, num_proc)
        meta[f"{split}_documents"] = len(docs)
    save_tokenizer(tok, directory / "tokenizer")
    meta["key"] = key
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _write_split(directory: Path, split: str, tok: Tokenizer, docs: list[str], dtype: str, num_proc: int) -> int:
    """Tokenize ``docs`` (EOT after each) into ``<split>.bin`` and ``<split>.idx``; return the token count."""
    from datasets import Dataset, Features, List, Value

    encoder = Tokenizer.from_str(tok.to_str())
    # A document that contains the text "<|endoftext|>" must not gain a document boundary.
    encoder.encode_special_tokens = True
    ids = Dataset.from_dict({"text": docs}).map(
        _encode,
        fn_kwargs={"tok": encoder, "eot": eot_id(tok)},
        batched=True,
        remove_columns=["text"],
        features=Features({"ids": List(Value(dtype))}),
        num_proc=num_proc if num_proc > 1 else None,
        # An explicit fingerprint spares datasets from hashing the tokenizer; nothing is cached on disk.
        new_fingerprint=hashlib.sha256(f"{directory}{split}".encode()).hexdigest()[:16],
    )
    written, starts = 0, []
    with open(directory / f"{split}.bin", "wb") as out:
        for table in ids.with_format("arrow").iter(batch_size=10_000):
            for chunk in table.column("ids").chunks:
                offsets = chunk.offsets.to_numpy()
                starts.append(offsets[:-1] - offsets[0] + written)
                values = chunk.flatten().to_numpy()
                values.tofile(out)
                written += len(values)
    np.concatenate(starts).astype(np.int64).tofile(directory / f"{split}.idx")
    return written


def _encode(batch: dict[str, list[str]], tok: Tokenizer, eot: int) -> dict[str, list[list[int]]]:
    encodings = tok.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"ids": [enc.ids + [eot] for enc in encodings]}


def _publish(tmp: Path, directory: Path, key: dict) -> None:
    """Rename the finished ``tmp`` to ``directory``; another process may have published it first."""
    try:
        os.rename(tmp, directory)
    except OSError:
        if _load_cached(directory, key) is not None:
            return
        shutil.rmtree(directory)  # an invalid leftover (e.g. edited by hand) is in the way
        os.rename(tmp, directory)


def _load_cached(directory: Path, key: dict) -> PreparedData | None:
    """The prepared data in ``directory`` if it is complete and was built from ``key``, else None."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not (directory / "tokenizer" / "tokenizer.json").is_file():
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        expected = {"bin": meta[f"{split}_tokens"] * itemsize, "idx": meta[f"{split}_documents"] * 8}
        for suffix, size in expected.items():
            path = directory / f"{split}.{suffix}"
            if not path.is_file() or path.stat().st_size != size:
                return None
    return _prepared(directory, meta)


def _prepared(directory: Path, meta: dict) -> PreparedData:
    return PreparedData(
        directory=directory,
        train_path=directory / "train.bin",
        val_path=directory / "val.bin",
        tokenizer_dir=directory / "tokenizer",
        vocab_size=meta["vocab_size"],
        eot_id=meta["eot_id"],
        dtype=meta["dtype"],
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
    )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' progress bars (noise in multi-rank logs); prepare logs its own lines."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
