"""Megatron's indexed data set (.bin/.idx): files megatron-core writes read here with the same tokens and
documents, files written here read by megatron-core, training from them through the CLI, bad input."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import compose_config, read_metrics, run_train, small_corpus
from trainer.config.cli import preflight
from trainer.config.schema import BadInput, ConfigError
from trainer.data.indexed import IndexedReader, IndexedWriter, TokenRange, export_prepared, main
from trainer.data.setup import build_streams, prepare_data

with warnings.catch_warnings():  # megatron.core warns that Transformer Engine and Apex are absent (CPU)
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def _documents(seed: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=n) for n in (5, 0, 17, 1, 300, 2, 64)]


def _megatron_write(prefix: Path, docs: list[np.ndarray], dtype, split_sequences: bool = False) -> None:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        if split_sequences and len(doc) > 2:  # a document of several sequences (--split-sentences)
            half = len(doc) // 2
            builder.add_item(torch.from_numpy(doc[:half]))
            builder.add_item(torch.from_numpy(doc[half:]))
            builder.end_document()
        else:
            builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("split_sequences", [False, True], ids=["one-sequence", "several-sequences"])
@pytest.mark.parametrize(("dtype", "high"), [(np.uint16, 65_000), (np.int32, 200_000)], ids=["uint16", "int32"])
def test_megatron_core_files_read_with_the_same_tokens(tmp_path, dtype, high, split_sequences):
    docs = _documents(1, high)
    _megatron_write(tmp_path / "ref", docs, dtype, split_sequences)
    ours, theirs = IndexedReader(tmp_path / "ref"), IndexedDataset(str(tmp_path / "ref"))
    assert ours.dtype == dtype.__name__ and ours.num_documents == len(docs)
    assert ours.num_sequences == len(theirs) == (len(docs) + 4 if split_sequences else len(docs))
    for i, doc in enumerate(docs):
        assert ours.document(i).dtype == dtype and np.array_equal(ours.document(i), doc)
    assert list(map(len, ours)) == [len(d) for d in docs]
    flat = np.concatenate(docs)
    assert isinstance(ours.tokens, np.memmap) and np.array_equal(ours.tokens, flat)
    assert np.array_equal(np.concatenate([theirs[i] for i in range(len(theirs))]), flat)
    assert ours.max_token() == flat.max()
    # Training reads any document range in place as a TokenFile.
    part = TokenRange(tmp_path / "ref.bin", ours.dtype, int(ours.doc_starts[2]), int(ours.doc_starts[5]))
    assert np.array_equal(part.tokens, np.concatenate(docs[2:5])) and part.num_samples(8) == (len(part) - 1) // 8


@pytest.mark.parametrize(("dtype", "high"), [(np.uint16, 65_000), (np.int32, 200_000)], ids=["uint16", "int32"])
def test_our_files_are_read_by_megatron_core_and_equal_its_own(tmp_path, dtype, high):
    docs = _documents(2, high)
    with IndexedWriter(tmp_path / "ours", dtype.__name__) as writer:
        for doc in docs:
            writer.add_document(doc)
    theirs = IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs) and theirs.index.dtype == dtype
    assert list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        assert theirs[i].dtype == dtype and np.array_equal(theirs[i], doc)
    assert np.array_equal(theirs.get(4, offset=10, length=7), docs[4][10:17])
    _megatron_write(tmp_path / "ref", docs, dtype)
    for suffix in ("bin", "idx"):  # byte for byte what megatron-core's builder writes
        assert (tmp_path / f"ours.{suffix}").read_bytes() == (tmp_path / f"ref.{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_spools_lengths_in_chunks_and_refuses_ids_beyond_the_dtype(tmp_path, monkeypatch):
    import trainer.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHUNK", 3)  # many spool/idx chunks with a few documents
    docs = [np.arange(n) for n in range(11)]
    with IndexedWriter(tmp_path / "d", "uint16") as writer:
        for doc in docs:
            writer.add_document(doc)
    theirs = IndexedDataset(str(tmp_path / "d"))
    assert [list(theirs[i]) for i in range(len(docs))] == [list(d) for d in docs]
    with pytest.raises(ValueError, match="do not fit uint16"), IndexedWriter(tmp_path / "bad", "uint16") as writer:
        writer.add_document([1, 70_000])
    assert not list(tmp_path.glob("bad*"))  # an aborted write leaves nothing


def _megatron_corpus(tmp_path: Path, data_cache: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """A real corpus tokenized as Megatron's preprocess_data.py --append-eod would, written by megatron-core."""
    from trainer.data.tokenizer import EOT, save_tokenizer, train_bpe

    text = small_corpus(data_cache).read_text()[:300_000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tok = train_bpe(paragraphs, 512)
    save_tokenizer(tok, tmp_path / "tokenizer")
    eod = tok.token_to_id(EOT)
    docs = [np.array([*enc.ids, eod]) for enc in tok.encode_batch(paragraphs, add_special_tokens=False)]
    _megatron_write(tmp_path / "corpus_text_document", docs, np.uint16)
    return tmp_path / "corpus_text_document", tmp_path / "tokenizer", docs


def _overrides(prefix: Path, tokenizer: Path, cache: Path) -> list[str]:
    return [
        "debug=smoke",
        "data=megatron",
        f"data.megatron.train_prefix={prefix}",
        f"data.tokenizer.source={tokenizer}",
        f"data.cache_dir={cache}",
    ]


def test_train_three_steps_from_megatron_files(tmp_path, data_cache):
    prefix, tokenizer, docs = _megatron_corpus(tmp_path, data_cache)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, [*_overrides(prefix, tokenizer, tmp_path / "cache"), "train.steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert f"{len(docs) - round(len(docs) * 0.05):,} of" in proc.stdout and "read in place" in proc.stdout
    print(f"\n{len(docs)} documents, losses {losses}")


def test_splits_are_document_ranges_of_the_files_read_in_place(tmp_path, data_cache):
    prefix, tokenizer, docs = _megatron_corpus(tmp_path, data_cache)
    cfg, _ = compose_config([*_overrides(prefix, tokenizer, tmp_path / "cache"), "data.val_fraction=0.1"])
    prepared = prepare_data(cfg)
    held = round(len(docs) * 0.1)
    flat = np.concatenate(docs)
    train, val = prepared.token_file("train"), prepared.token_file("val")
    assert np.array_equal(train.tokens, np.concatenate(docs[:-held])) and prepared.train_tokens == len(train)
    assert np.array_equal(val.tokens, np.concatenate(docs[-held:])) and len(train) + len(val) == len(flat)
    assert prepared.train_path == prepared.val_path == Path(f"{prefix}.bin") and prepared.dtype == "uint16"
    assert (prepared.tokenizer_dir / "tokenizer.json").is_file() and prepared.vocab_size == 512
    plan = type("Plan", (), {"micro_batch": 2, "grad_accum": 2, "global_batch": 4})()
    stream, val_batches = build_streams(cfg, plan, prepared, 0, 1)
    x, y = stream.next_micro_batch()
    assert x.shape == (2, cfg.model.seq_len) and torch.equal(x[:, 1:], y[:, :-1])
    first = torch.from_numpy(np.concatenate(docs[-held:])[: cfg.model.seq_len].astype(np.int64))
    assert torch.equal(val_batches[0][0][0], first)  # validation starts at the first held-out document

    # A separate validation prefix (our writer) is used whole.
    with IndexedWriter(tmp_path / "val", "uint16") as writer:
        for doc in docs[:50]:
            writer.add_document(doc)
    cfg, _ = compose_config(
        [*_overrides(prefix, tokenizer, tmp_path / "cache"), f"data.megatron.val_prefix={tmp_path}/val"]
    )
    prepared = prepare_data(cfg)
    assert prepared.train_tokens == len(flat) and np.array_equal(
        prepared.token_file("val").tokens, np.concatenate(docs[:50])
    )


def test_export_of_a_prepared_corpus_is_read_by_megatron_core(tmp_path, data_cache, capsys):
    from tests.conftest import tiny_corpus_overrides

    cfg, _ = compose_config(["debug=smoke", *tiny_corpus_overrides(data_cache)])
    prepared = prepare_data(cfg)
    assert main(["export", str(prepared.directory), str(tmp_path / "out" / "corpus")]) == 0
    printed = capsys.readouterr().out
    for split, path in (("train", prepared.train_path), ("val", prepared.val_path)):
        tokens = np.fromfile(path, dtype=prepared.dtype)
        starts = np.fromfile(path.with_suffix(".idx"), dtype=np.int64)
        theirs = IndexedDataset(str(tmp_path / "out" / f"corpus_{split}"))
        assert len(theirs) == len(starts) and theirs.index.dtype == np.uint16
        assert np.array_equal(np.concatenate([theirs[i] for i in range(len(theirs))]), tokens)
        assert all(theirs[i][-1] == prepared.eot_id for i in range(len(theirs)))  # each document ends with EOT
        assert f"{split}: {len(starts):,} documents, {len(tokens):,} uint16 tokens" in printed
    assert export_prepared(prepared.directory, tmp_path / "again")["train"] == tmp_path / "again_train"


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    docs = _documents(3, 500)
    _megatron_write(tmp_path / "good", docs, np.uint16)
    _megatron_write(tmp_path / "wide", docs, np.int32)
    idx = (tmp_path / "good.idx").read_bytes()
    bad = {}
    for name, content in {
        "magic": b"XXIDIDX\x00\x00" + idx[9:],
        "version": idx[:9] + (2).to_bytes(8, "little") + idx[17:],
        "dtype": idx[:17] + bytes([6]) + idx[18:],  # float64 is no token dtype
    }.items():
        (tmp_path / f"{name}.idx").write_bytes(content)
        (tmp_path / f"{name}.bin").write_bytes((tmp_path / "good.bin").read_bytes())
        bad[name] = tmp_path / name
    (tmp_path / "short.idx").write_bytes(idx)
    (tmp_path / "short.bin").write_bytes((tmp_path / "good.bin").read_bytes()[:-2])
    (tmp_path / "only.bin").write_bytes(b"")
    return bad | {"good": tmp_path / "good", "wide": tmp_path / "wide", "short": tmp_path / "short"}


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ([], "data.megatron.train_prefix", "give the prefix"),
        (["data.megatron.train_prefix={d}/missing"], "data.megatron.train_prefix", "no such file"),
        (["data.megatron.train_prefix={d}/only"], "data.megatron.train_prefix", "only.idx: no such file"),
        (["data.megatron.train_prefix={d}/magic"], "data.megatron.train_prefix", "no MMIDIDX header"),
        (["data.megatron.train_prefix={d}/version"], "data.megatron.train_prefix", "version 2"),
        (["data.megatron.train_prefix={d}/dtype"], "data.megatron.train_prefix", "dtype code 6"),
        (
            ["data.megatron.train_prefix={d}/good", "data.megatron.val_prefix={d}/wide"],
            "data.megatron.val_prefix",
            "dtype int32, the train files' is uint16",
        ),
        (["data.megatron.train_prefix={d}/good", "data.tokenizer.source=train"], "data.tokenizer.source", "made with"),
        (["data.megatron.train_prefix={d}/good", "data.tokenizer.source="], "data.tokenizer.source", "made with"),
    ],
    ids=["no-prefix", "missing", "no-idx", "magic", "version", "dtype", "val-dtype", "tok-train", "tok-none"],
)
def test_bad_megatron_config_is_one_line(tmp_path, extra, key, words, monkeypatch, capsys):
    _bad_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    overrides = ["debug=smoke", "data=megatron", f"data.tokenizer.source={tmp_path}/tokenizer.json"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exit_info:
        preflight([*overrides, *(e.format(d=tmp_path) for e in extra)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and words in lines[0] and "Traceback" not in lines[0], lines


def test_token_ids_beyond_the_tokenizer_and_a_short_bin_are_refused(tmp_path, data_cache):
    prefix, tokenizer, _ = _megatron_corpus(tmp_path, data_cache)
    (tmp_path / "bad").mkdir()
    bad = _bad_files(tmp_path / "bad")
    wide = tmp_path / "wide"  # ids up to 499 fit a 512 tokenizer: make one that does not
    with IndexedWriter(wide, "uint16") as writer:
        writer.add_document([1, 2, 600])
        writer.add_document([3, 4])
    for train, words in ((wide, "hold token id 600, but the tokenizer"), (bad["short"], "wrong dtype, truncated")):
        cfg, _ = compose_config([*_overrides(train, tokenizer, tmp_path / "cache")])
        with pytest.raises(BadInput, match=words) as err:
            prepare_data(cfg)
        assert "\n" not in str(err.value)
    proc = run_train(tmp_path / "run", _overrides(wide, tokenizer, tmp_path / "cache"), timeout=120)
    assert proc.returncode == 2 and "token id 600" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert main(["info", str(prefix)]) == 0 and main(["info", str(tmp_path / "nothing")]) == 2


def test_megatron_files_as_a_blend_entry(tmp_path, data_cache):
    """Megatron's own blending convention (weighted prefixes), mixed here with a text source: the files are read
    in place, the text is tokenized with the same tokenizer, and samples come from both by weight."""
    from trainer.data.blend import BlendedData

    prefix, tokenizer, docs = _megatron_corpus(tmp_path, data_cache)
    text = tmp_path / "text.txt"
    text.write_text(small_corpus(data_cache).read_text()[300_000:400_000])
    blend = (
        f"data.blend=[{{weight:0.6,source:megatron,megatron:{{train_prefix:{prefix}}}}},{{weight:0.4,paths:[{text}]}}]"
    )
    overrides = [
        "debug=smoke",
        "data=blend",
        blend,
        f"data.tokenizer.source={tokenizer}",
        f"data.cache_dir={tmp_path}/c",
    ]
    cfg, _ = compose_config(overrides)
    prepared = prepare_data(cfg)
    assert isinstance(prepared, BlendedData) and prepared.weights == (0.6, 0.4)
    held = round(len(docs) * cfg.data.val_fraction)
    assert np.array_equal(prepared.sources[0].token_file("train").tokens, np.concatenate(docs[:-held]))
    assert prepared.sources[1].vocab_size == 512  # tokenized with the Megatron files' tokenizer
    plan = type("Plan", (), {"micro_batch": 2, "grad_accum": 5, "global_batch": 10})()
    stream, _ = build_streams(cfg, plan, prepared, 0, 1)
    origins = [int(s) for s, _ in stream._permutation()[:100]]
    assert origins.count(0) == 60 and origins.count(1) == 40

    cfg, _ = compose_config([*overrides[:3], f"data.cache_dir={tmp_path}/c"])  # a BPE to train: refused
    with pytest.raises(ConfigError, match=r"data.blend\[0\]: Megatron files need the tokenizer"):
        prepare_data(cfg)
