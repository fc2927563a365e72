import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

import trainer.data.prepare as prep
from trainer.config.schema import DataConfig, TokenizerConfig
from trainer.data.tokenizer import EOT, load_tokenizer

VAL_EVERY = 4  # val_fraction 0.25


def make_paragraphs(n: int) -> list[str]:
    """Varied paragraphs: prose, code with indentation and whitespace runs, unicode, a literal EOT."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(f"Paragraph {i}: the quick brown fox jumps over {i * 7} lazy dogs.\nSecond line.")
        elif kind == 1:
            out.append(f"def f{i}(x):\n    if x > {i}:\n\treturn x  *  {i}\n    return None")
        elif kind == 2:
            out.append(f"    indented start {i}, caf\u00e9 \u65e5\u672c {chr(0x1F600 + i % 50)}")
        else:
            out.append(f"quoting {EOT} inside document {i} must not split it")
    return out


def cfg_for(tmp_path: Path, paths: list[Path], **overrides) -> DataConfig:
    fields = {
        "name": "tiny",
        "source": "files",
        "paths": [str(p) for p in paths],
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 1 / VAL_EVERY,
        "tokenizer": TokenizerConfig(vocab_size=400),
    }
    return DataConfig(**(fields | overrides))


def read_documents(prepared, split: str) -> list[list[int]]:
    tokens = np.fromfile(prepared.directory / f"{split}.bin", dtype=prepared.dtype)
    starts = np.fromfile(prepared.directory / f"{split}.idx", dtype=np.int64)
    ends = [*starts[1:], len(tokens)]
    return [tokens[a:b].tolist() for a, b in zip(starts, ends)]


def decoded_documents(prepared, split: str) -> list[str]:
    tok = load_tokenizer(prepared.tokenizer_dir)
    docs = read_documents(prepared, split)
    assert all(doc[-1] == prepared.eot_id and prepared.eot_id not in doc[:-1] for doc in docs)
    return [tok.decode(doc[:-1]) for doc in docs]


@pytest.fixture
def paragraphs() -> list[str]:
    return make_paragraphs(60)


@pytest.fixture
def text_corpus(tmp_path, paragraphs) -> Path:
    """Two text files in a directory; blank lines (some with spaces) separate the paragraphs."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(paragraphs[:30]) + "\n")
    (corpus / "b.txt").write_text("\n\n  \n\n".join(paragraphs[30:]))
    (corpus / ".hidden").write_text("never read")
    return corpus


@pytest.fixture
def jsonl_corpus(tmp_path, paragraphs) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": i, "content": p}) + "\n" for i, p in enumerate(paragraphs)))
    return path


def test_prepare_writes_documents_in_order_with_eot(tmp_path, text_corpus, paragraphs):
    prepared = prep.prepare(cfg_for(tmp_path, [text_corpus]), log=lambda _: None)
    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert prepared.dtype == meta["dtype"] == "uint16"
    assert prepared.vocab_size == meta["vocab_size"] == 400
    assert prepared.train_path.stat().st_size == 2 * prepared.train_tokens == 2 * meta["train_tokens"]
    assert prepared.val_path.stat().st_size == 2 * prepared.val_tokens == 2 * meta["val_tokens"]
    # Every VAL_EVERY-th paragraph is validation, the rest train, each round-tripping exactly.
    assert decoded_documents(prepared, "val") == paragraphs[VAL_EVERY - 1 :: VAL_EVERY]
    expected_train = [p for i, p in enumerate(paragraphs) if i % VAL_EVERY != VAL_EVERY - 1]
    assert decoded_documents(prepared, "train") == expected_train
    assert meta["train_documents"] == len(expected_train)
    assert load_tokenizer(prepared.tokenizer_dir).token_to_id(EOT) == prepared.eot_id


def test_second_prepare_reuses_cache(tmp_path, text_corpus, monkeypatch):
    cfg = cfg_for(tmp_path, [text_corpus])
    first = prep.prepare(cfg, log=lambda _: None)
    mtime = first.train_path.stat().st_mtime_ns

    def no_corpus_reads(cfg):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(prep, "iter_documents", no_corpus_reads)
    lines = []
    started = time.perf_counter()
    second = prep.prepare(cfg, log=lines.append)
    assert time.perf_counter() - started < 2.0
    assert second == first
    assert first.train_path.stat().st_mtime_ns == mtime
    assert "cached" in lines[0]
    assert [p.name for p in Path(cfg.cache_dir).iterdir()] == [first.directory.name]  # no temp leftovers


def test_inputs_that_change_the_result_change_the_directory(tmp_path, text_corpus):
    cfg = cfg_for(tmp_path, [text_corpus])
    base = prep.cache_directory(cfg)
    assert prep.cache_directory(cfg) == base
    assert prep.cache_directory(cfg_for(tmp_path, [text_corpus], tokenizer=TokenizerConfig(vocab_size=500))) != base
    assert prep.cache_directory(cfg_for(tmp_path, [text_corpus], val_fraction=0.1)) != base
    (text_corpus / "a.txt").write_text("edited\n\nagain")
    assert prep.cache_directory(cfg) != base


def test_crash_while_writing_leaves_no_cache(tmp_path, text_corpus, monkeypatch):
    cfg = cfg_for(tmp_path, [text_corpus])

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "save_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg, log=lambda _: None)
    assert list(Path(cfg.cache_dir).iterdir()) == []
    monkeypatch.undo()
    assert prep.prepare(cfg, log=lambda _: None).directory.is_dir()


def test_jsonl_source_reads_text_field(tmp_path, jsonl_corpus, paragraphs):
    cfg = cfg_for(tmp_path, [jsonl_corpus], text_field="content", max_documents=40)
    assert list(prep.iter_documents(cfg)) == paragraphs[:40]
    prepared = prep.prepare(cfg, log=lambda _: None)
    assert decoded_documents(prepared, "val") == paragraphs[VAL_EVERY - 1 : 40 : VAL_EVERY]


def test_hub_source_streams_local_data_files(tmp_path, jsonl_corpus, paragraphs, monkeypatch):
    import datasets

    calls = []
    load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append(kw) or load_dataset(*a, **kw))
    cfg = cfg_for(tmp_path, [jsonl_corpus], source="hub", hub_name="json", text_field="content")
    assert list(prep.iter_documents(cfg)) == paragraphs
    assert calls[0]["streaming"] is True
    prepared = prep.prepare(cfg, log=lambda _: None)
    assert len(decoded_documents(prepared, "train")) == len(paragraphs) - len(paragraphs) // VAL_EVERY


def test_hub_text_builder_gives_lines(tmp_path, text_corpus):
    path = text_corpus / "a.txt"
    cfg = cfg_for(tmp_path, [path], source="hub", hub_name="text", max_documents=5)
    assert list(prep.iter_documents(cfg)) == path.read_text().split("\n")[:5]


def test_max_documents_truncates(tmp_path, text_corpus, paragraphs):
    cfg = cfg_for(tmp_path, [text_corpus], max_documents=7)
    assert list(prep.iter_documents(cfg)) == paragraphs[:7]


def test_pystdlib_documents_skip_tests_and_packages():
    files = prep.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        dirs = path.relative_to(root).parts[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(dirs), path
    assert root / "json" / "decoder.py" in files
    docs = list(prep.iter_documents(DataConfig(source="pystdlib")))
    assert len(docs) == len(files)
    assert docs[files.index(root / "json" / "decoder.py")].startswith('"""Implementation of JSONDecoder')


def test_pystdlib_prepare_small_slice(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_documents=40, tokenizer=TokenizerConfig(vocab_size=512))
    prepared = prep.prepare(cfg, log=lambda _: None)
    assert prepared.directory.name.startswith("pystdlib-")
    assert prepared.train_tokens > 10 * prepared.val_tokens > 0


@pytest.mark.parametrize(
    "contents, overrides, message",
    [
        ({}, {}, "no documents found"),
        ({"blank.txt": "\n\n   \n"}, {}, "no documents found"),
        ({"r.jsonl": '{"text": ""}\n{"text": null}\n'}, {}, "all 2 documents are empty"),
        ({"r.jsonl": '{"body": "hi"}\n'}, {}, "data.text_field='text'"),
        ({"few.txt": "one\n\ntwo\n\nthree"}, {}, "too few"),
        (None, {}, "does not exist"),
    ],
)
def test_clear_errors(tmp_path, contents, overrides, message):
    """``contents`` (file name -> text) fills the corpus directory; None leaves it missing."""
    corpus = tmp_path / "corpus"
    if contents is not None:
        corpus.mkdir()
        for name, text in contents.items():
            (corpus / name).write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        prep.prepare(cfg_for(tmp_path, [corpus], **overrides), log=lambda _: None)
    assert "\n" not in str(err.value)
