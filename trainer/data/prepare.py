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

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.pool
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

from trainer.config.schema import DataConfig, TokenizerConfig
from trainer.data.tokenizer import EOT, eot_id, load_tokenizer, save_tokenizer, set_eot, train_bpe

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
            yield from _streamed_paragraphs(path)


def paragraphs(text: str) -> list[str]:
    """Split plain text at blank lines, so one big file (tinyshakespeare) still gives many documents."""
    return [p for p in _PARAGRAPH_BREAK.split(text.rstrip("\n")) if p.strip()]


def _streamed_paragraphs(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """``paragraphs(path's text)``, reading ``block`` characters at a time (memory: one paragraph + a block).

    The text up to the start of a blank-line run that is followed by more text splits exactly as in
    the whole file (the regex neither looks back nor past the next non-blank character), so it is split
    and the rest (from that run on) is carried over to the next block.
    """
    with open(path, encoding="utf-8", errors="replace") as file:  # universal newlines, like read_text
        carry = ""
        while text := file.read(block):
            carry += text
            settled = len(carry.rstrip())  # a break ending at or after this may still grow
            cut = None
            for match in _PARAGRAPH_BREAK.finditer(carry):
                if match.end() >= settled:
                    break
                cut = match.start()
            if cut:
                yield from paragraphs(carry[:cut])
                carry = carry[cut:]
        yield from paragraphs(carry)


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
    # The separator is trained into a new BPE and written between documents: another one, other files.
    # Absent at its default, so caches made before it was a key stay valid.
    key = {"eot": cfg.tokenizer.eot} if cfg.tokenizer.eot != EOT else {}
    source = cfg.tokenizer.source
    if source == "train":
        key |= {"source": "train", "vocab_size": cfg.tokenizer.vocab_size}
        if bpe_sample_fraction(cfg, cfg.tokenizer.train_bytes) != 1.0:  # absent when the BPE sees all
            key["train_bytes"] = cfg.tokenizer.train_bytes
        return key
    path = Path(source)
    path = path / "tokenizer.json" if path.is_dir() else path
    content = path.read_bytes() if path.is_file() else b""
    return key | {"source": str(path.resolve()), "sha256": hashlib.sha256(content).hexdigest()}


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
#
# Out of core: documents are streamed from the source twice at most (once to train the tokenizer,
# once to tokenize), never collected. The main process reads and writes; ``num_workers`` spawned
# processes tokenize chunks of about CHUNK_CHARS characters, a bounded number of chunks in flight,
# results in corpus order, so the bytes written do not depend on the worker count.

CHUNK_CHARS = 1 << 20  # characters of text per chunk sent to a worker
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: bounds memory, keeps every worker busy


def prepare(cfg: DataConfig, log: Log = print, progress: bool | None = None) -> PreparedData:
    """Tokenize the corpus into ``<cache_dir>/<name>-<hash>/``, or reuse it if already there.

    ``progress`` shows a live line (documents, tokens, MB, tokens/s) on stderr; by default only
    when stderr is a terminal.
    """
    num_workers(cfg)  # refuses a bad data.num_proc before anything is read
    set_eot(cfg.tokenizer.eot)  # the separator these files are made with (a run keeps the same one)
    if cfg.tokenizer.train_bytes < 0:
        raise ValueError(f"data.tokenizer.train_bytes={cfg.tokenizer.train_bytes}: must be >= 0 (0 = all the text)")
    key = cache_key(cfg)
    directory = Path(cfg.cache_dir) / f"{cfg.name}-{_digest(key)}"
    cached = _load_cached(directory, key)
    if cached is not None:
        log(f"data: using cached {directory}")
        return cached
    if progress is None:
        progress = sys.stderr.isatty()
    started = time.perf_counter()
    with _quiet_datasets():
        tok = _tokenizer(cfg, log, progress)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            meta = _write(tmp, tok, cfg, key, log, progress)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
            _publish(tmp, directory, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"data: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"in {time.perf_counter() - started:.1f}s -> {directory}"
    )
    return _prepared(directory, meta)


def num_workers(cfg: DataConfig) -> int:
    """Tokenizing processes: ``data.num_proc``, or one per available core when it is 0."""
    if cfg.num_proc < 0:
        raise ValueError(f"data.num_proc={cfg.num_proc}: must be >= 0 (0 = one per core)")
    if cfg.num_proc > 0:
        return cfg.num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Corpus:
    """One streamed pass over the non-empty documents, numbered; checks the counts when exhausted."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.documents = 0  # all documents seen, empty ones included
        self.nonempty = 0
        self.chars = 0
        self.finished = False

    def __iter__(self) -> Iterator[str]:
        for doc in iter_documents(self.cfg):
            self.documents += 1
            if doc:
                self.nonempty += 1
                self.chars += len(doc)
                yield doc
        self.finished = True
        self.check()

    def train_documents(self) -> Iterator[str]:
        """The documents that go to training (every k-th is held out)."""
        k = val_every(self.cfg.val_fraction)
        return (doc for i, doc in enumerate(self) if i % k != k - 1)

    def check(self) -> None:
        cfg = self.cfg
        where = {"pystdlib": "the standard library", "files": cfg.paths, "hub": cfg.hub_name}[cfg.source]
        if not self.documents:
            raise ValueError(
                f"data.source={cfg.source!r}: no documents found in {where}; check data.paths / data.hub_name"
            )
        if not self.nonempty:
            raise ValueError(
                f"data.text_field={cfg.text_field!r}: all {self.documents} documents are empty; "
                "point it at the column holding the text"
            )
        k = val_every(cfg.val_fraction)
        if self.nonempty < k:
            raise ValueError(
                f"data.val_fraction={cfg.val_fraction}: {self.nonempty} documents are too few to hold any out "
                f"(every k-th goes to validation, k={k}); add documents or raise it"
            )


def _tokenizer(cfg: DataConfig, log: Log, progress: bool) -> Tokenizer:
    if cfg.tokenizer.source != "train":
        log(f"data: loading tokenizer {cfg.tokenizer.source}")
        return load_tokenizer(cfg.tokenizer.source)
    return fit_tokenizer([(cfg, cfg.tokenizer.train_bytes)], cfg.tokenizer, log, progress)


def fit_tokenizer(parts: list[tuple[DataConfig, int]], tok: TokenizerConfig, log: Log, progress: bool) -> Tokenizer:
    """A byte-level BPE fitted on the training documents of ``parts``: (source, its byte budget; 0 = all).

    In a child process: what BPE training allocates (one count per distinct word and the merge tables,
    ~1 GB on 1 GB of diverse text) goes back to the system when it exits, instead of staying in this
    process' heap, where the forked tokenizing workers would copy it page by page.
    """
    started = time.perf_counter()
    with _pool(1) as pool:
        trained = Tokenizer.from_str(pool.apply(_train_tokenizer, (parts, tok.vocab_size, tok.eot, progress)))
    log(f"data: trained byte-level BPE, vocab {trained.get_vocab_size():,} in {time.perf_counter() - started:.1f}s")
    return trained


def _train_tokenizer(parts: list[tuple[DataConfig, int]], vocab_size: int, eot: str, progress: bool) -> str:
    docs = itertools.chain.from_iterable(
        bpe_sample(_Corpus(cfg).train_documents(), budget, bpe_sample_fraction(cfg, budget)) for cfg, budget in parts
    )
    set_eot(eot)  # this process only serves this call
    with _Progress(progress, "tokenizer") as bar:
        return train_bpe(bar.track(docs), vocab_size).to_str()


def bpe_sample_fraction(cfg: DataConfig, budget: int) -> float | None:
    """The share of a source's text the BPE is fitted on for a ``budget`` of bytes: 1.0 all of it (budget 0, or
    more than the source), less to stay near the budget, or None where the size is not known before reading
    (hub streams, a ``max_documents`` cap)."""
    if budget == 0:
        return 1.0
    if cfg.max_documents > 0 or cfg.source == "hub":
        return None
    files = stdlib_files() if cfg.source == "pystdlib" else _expand_paths(cfg.paths)
    return min(1.0, budget / max(1, sum(f.stat().st_size for f in files)))


def bpe_sample(docs: Iterable[str], budget: int, fraction: float | None) -> Iterator[str]:
    """The documents the BPE sees: a document is kept while the bytes kept stay within ``fraction`` of the
    bytes seen, so the sample spreads evenly over every part of the corpus (deterministic); where the size is
    unknown (``fraction`` None), the first ``budget`` bytes."""
    seen = kept = 0
    for doc in docs:
        size = len(doc.encode("utf-8", "replace"))
        seen += size
        if fraction is None and kept >= budget:
            return
        if fraction is None or kept + size <= fraction * seen:
            kept += size
            yield doc


def _pool(workers: int, init: Callable | None = None, init_args: tuple = ()) -> multiprocessing.pool.Pool:
    # fork: workers start at once and any script may call prepare() (spawn needs a __main__ guard); the
    # tokenizers library disables its own threads in a forked child that inherits used ones.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return context.Pool(workers, init, init_args)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _write(directory: Path, tok: Tokenizer, cfg: DataConfig, key: dict, log: Log, progress: bool) -> dict:
    """Write tokens, document offsets, tokenizer and (last) meta.json; return the meta dict."""
    dtype = token_dtype(tok.get_vocab_size())
    meta: dict = {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id(tok),
    }
    meta |= _write_splits(directory, tok, cfg, dtype, log, progress)
    save_tokenizer(tok, directory / "tokenizer")
    meta["key"] = key
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _write_splits(directory: Path, tok: Tokenizer, cfg: DataConfig, dtype: str, log: Log, progress: bool) -> dict:
    """Tokenize the streamed documents (EOT after each) into ``<split>.bin`` / ``<split>.idx``, appending."""
    k = val_every(cfg.val_fraction)
    workers = num_workers(cfg)
    corpus = _Corpus(cfg)
    started = time.perf_counter()
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    with contextlib.ExitStack() as stack:
        files = {
            f"{split}.{suffix}": stack.enter_context(open(directory / f"{split}.{suffix}", "wb"))
            for split in ("train", "val")
            for suffix in ("bin", "idx")
        }
        bar = stack.enter_context(_Progress(progress, "tokenize"))
        chunks = _chunks(corpus)
        args = (tok.to_str(), eot_id(tok), k, dtype)
        for result in _ordered_map(_encode_chunk, chunks, workers, _init_worker, args):
            for split, (ids, lengths) in zip(("train", "val"), result):
                starts = np.cumsum(lengths) - lengths + counts[f"{split}_tokens"]
                starts.astype(np.int64).tofile(files[f"{split}.idx"])
                ids.tofile(files[f"{split}.bin"])
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_documents"] += len(lengths)
            bar.update(corpus, counts["train_tokens"] + counts["val_tokens"])
    seconds = time.perf_counter() - started
    tokens = counts["train_tokens"] + counts["val_tokens"]
    log(
        f"data: {corpus.nonempty:,} documents from {cfg.source} ({counts['train_documents']:,} train, "
        f"{counts['val_documents']:,} val), {corpus.chars / 1e6:,.1f} M characters, {tokens:,} tokens "
        f"in {seconds:.1f}s on {workers} worker(s) ({tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return counts


def _chunks(corpus: _Corpus) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) of about CHUNK_CHARS characters each, in corpus order."""
    chunk: list[str] = []
    first = size = 0
    for i, doc in enumerate(corpus):
        if not chunk:
            first = i
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield first, chunk
            chunk, size = [], 0
    if chunk:
        yield first, chunk


def _ordered_map(fn: Callable, items: Iterable[tuple], workers: int, init: Callable, init_args: tuple) -> Iterator:
    """``fn(*item)`` for each item in a pool of spawned processes, results in order, few items in flight.

    ``Pool.imap`` would read ``items`` to the end ahead of the workers (the whole corpus in memory);
    here at most ``IN_FLIGHT_PER_WORKER * workers`` chunks are queued.
    """
    with _environ(TOKENIZERS_PARALLELISM="false"), _pool(workers, init, init_args) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, item))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables while the block runs (children started inside inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_worker: dict = {}


def _init_worker(tokenizer_json: str, eot: int, k: int, dtype: str) -> None:
    """Load the tokenizer once per worker process; one thread each (the processes are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoder = Tokenizer.from_str(tokenizer_json)
    # A document that contains the text "<|endoftext|>" must not gain a document boundary.
    encoder.encode_special_tokens = True
    cut = splits_exactly(json.loads(tokenizer_json))
    _worker.update(encoder=encoder, eot=eot, k=k, dtype=np.dtype(dtype), cut=cut)


# An encoding costs ~100 bytes per token (ids, offsets, token strings) on top of the text: a document longer
# than this is encoded in pieces where that gives the ids of the whole (``splits_exactly``), so a worker's
# memory is bounded by the chunk size, not by the longest document of the corpus.
PIECE_CHARS = 1 << 16
# A cut between a non-space character and a space, tab or newline: no alternative of GPT-2's pre-tokenizing
# regex matches a non-space followed by a space (a leading space joins the word after it, never the one
# before), so a pre-token always ends there, and the regex never looks back at what came before the cut.
_CUT = re.compile(r"(?<=\S)(?=[ \t\r\n])")


def splits_exactly(tokenizer: dict) -> bool:
    """Whether ``_CUT`` keeps the ids: a byte-level pre-tokenizer with GPT-2's regex (the BPE trained here,
    GPT-2's own) and no normalizer. Others (e.g. SentencePiece-style, which prepend a marker to every text)
    encode each document whole."""
    pre = tokenizer.get("pre_tokenizer") or {}
    return tokenizer.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def pieces(doc: str, size: int) -> list[str]:
    """``doc`` cut at ``_CUT`` into pieces of at least ``size`` characters (longer where no cut comes sooner)."""
    out, start = [], 0
    while len(doc) - start > size and (cut := _CUT.search(doc, start + size)):
        out.append(doc[start : cut.start()])
        start = cut.start()
    return [*out, doc[start:]]


def _encode_chunk(first: int, docs: list[str]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((train ids, train document lengths), (val ids, val document lengths)); EOT ends each document."""
    encoder, eot, k, dtype, cut = (_worker[key] for key in ("encoder", "eot", "k", "dtype", "cut"))
    texts, owners = [], []
    for j, doc in enumerate(docs):
        parts = pieces(doc, PIECE_CHARS) if cut else [doc]
        texts += parts
        owners += [j] * len(parts)
    ids: list[list[np.ndarray]] = [[] for _ in docs]
    for lo, hi in _batches([len(t) for t in texts], CHUNK_CHARS):  # a bounded number of encodings alive
        for j, enc in zip(owners[lo:hi], encoder.encode_batch_fast(texts[lo:hi], add_special_tokens=False)):
            ids[j].append(np.array(enc.ids, dtype=dtype))
    end = np.array([eot], dtype=dtype)
    out: dict[bool, tuple[list[np.ndarray], list[int]]] = {False: ([], []), True: ([], [])}
    for i, parts in enumerate(ids, start=first):
        arrays, lengths = out[i % k == k - 1]
        arrays += [*parts, end]
        lengths.append(sum(map(len, parts)) + 1)
    return tuple(
        (np.concatenate(arrays) if arrays else np.empty(0, dtype), np.array(lengths, dtype=np.int64))
        for arrays, lengths in out.values()
    )


def _batches(sizes: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of ``sizes`` adding up to at most ``limit`` (at least one item each)."""
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > limit:
            yield lo, i
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        yield lo, len(sizes)


class _Progress:
    """A rich live line on stderr (documents, MB, tokens, tokens/s), or nothing when disabled."""

    def __init__(self, enabled: bool, what: str) -> None:
        self.enabled, self.what = enabled, what
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("data {task.description}: {task.fields[line]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task(self.what, line="starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, corpus: _Corpus, tokens: int = 0) -> None:
        if not self.enabled:
            return
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        line = f"{corpus.nonempty:,} docs, {corpus.chars / 1e6:,.0f}M chars"
        if tokens:
            line += f", {tokens / 1e6:,.1f}M tokens, {rate / 1e3:,.0f}k tokens/s"
        self.bar.update(self.task, line=line)

    def track(self, docs: Iterable[str]) -> Iterator[str]:
        """Pass ``docs`` through, updating the line every 1,000 documents."""
        count = chars = 0
        for doc in docs:
            count += 1
            chars += len(doc)
            if self.enabled and count % 1000 == 0:
                self.bar.update(self.task, line=f"{count:,} docs, {chars / 1e6:,.0f}M chars")
            yield doc


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
