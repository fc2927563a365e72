"""Awkward corpora are handled or refused clearly: empty files, bytes that are not UTF-8, documents
shorter than a sample, a corpus smaller than one global batch, a token cache edited behind our back."""

from __future__ import annotations

import numpy as np

import trainer.data.prepare as prep
from conftest import run_train
from trainer.data.stream import SampleStream, TokenFile

from .test_prepare import cfg_for, decoded_documents, make_paragraphs


def _quiet(_: str) -> None:
    pass


def _corpus(tmp_path, files: dict[str, bytes]):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    return corpus


def _body(n: int = 40) -> bytes:
    return "\n\n".join(make_paragraphs(n)).encode()


def test_empty_files_are_skipped(tmp_path):
    corpus = _corpus(tmp_path, {"empty.txt": b"", "blank.txt": b"\n \n\n", "text.txt": _body()})
    prepared = prep.prepare(cfg_for(tmp_path, [corpus]), log=_quiet)
    docs = decoded_documents(prepared, "train") + decoded_documents(prepared, "val")
    assert len(docs) == 40 and all(doc.strip() for doc in docs)


def test_bytes_that_are_not_utf8_become_replacement_characters(tmp_path):
    latin1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1")  # \xe9 alone is invalid UTF-8
    corpus = _corpus(tmp_path, {"mixed.txt": _body() + b"\n\n" + latin1 + b" \xff\xfe end"})
    prepared = prep.prepare(cfg_for(tmp_path, [corpus]), log=_quiet)
    docs = decoded_documents(prepared, "train") + decoded_documents(prepared, "val")
    odd = [doc for doc in docs if doc.endswith(" end")]
    assert odd == ["caf\ufffd cr\ufffdme br\ufffdl\ufffde \ufffd\ufffd end"]


def test_documents_shorter_than_a_sample_are_packed_across_boundaries(tmp_path):
    tiny_docs = "\n\n".join(f"w{i}" for i in range(400)).encode()
    prepared = prep.prepare(cfg_for(tmp_path, [_corpus(tmp_path, {"tiny.txt": tiny_docs})]), log=_quiet)
    seq_len = 32  # each document is 2-3 tokens + EOT: a sample spans many documents
    stream = SampleStream(TokenFile(prepared.train_path, prepared.dtype), seq_len, 2, 1, 0, 1, seed=0)
    x, y = stream.next_micro_batch()
    assert x.shape == (2, seq_len) and (x == prepared.eot_id).sum() >= 2 * seq_len // 4
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_stale_token_cache_is_rebuilt(tmp_path):
    cfg = cfg_for(tmp_path, [_corpus(tmp_path, {"text.txt": _body()})])
    first = prep.prepare(cfg, log=_quiet)
    size = first.train_path.stat().st_size
    with first.train_path.open("r+b") as handle:  # a token file that no longer matches its index
        handle.truncate(size // 2)
    lines = []
    again = prep.prepare(cfg, log=lines.append)
    assert not any("using cached" in line for line in lines)
    assert again.train_path.stat().st_size == size
    assert decoded_documents(again, "train") == decoded_documents(first, "train")


def test_corpus_smaller_than_one_global_batch_is_refused_before_training(tmp_path, data_cache):
    corpus = _corpus(tmp_path, {"small.txt": _body(60)})
    overrides = [
        "data=files",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={data_cache}",
        "data.tokenizer.vocab_size=300",
    ]
    proc = run_train(tmp_path / "run", ["debug=smoke", *overrides, "parallel.global_batch=4096", "train.steps=1"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fewer than one global batch" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_validation_split_smaller_than_one_global_batch_is_refused(tmp_path, data_cache):
    """Training has enough samples, the held-out split (every 20th document) does not: refused, not
    validated on one batch that repeats its own samples."""
    corpus = _corpus(tmp_path, {"text.txt": _body(400)})
    data = ["data=files", f"data.paths=[{corpus}]", f"data.cache_dir={data_cache}", "data.tokenizer.vocab_size=300"]
    batch = ["parallel.micro_batch=8", "parallel.global_batch=64", "train.steps=1"]
    proc = run_train(tmp_path / "run", ["debug=smoke", *data, *batch])
    assert proc.returncode == 2, proc.stdout[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the validation split has" in lines[0] and "fewer than one global batch 64" in lines[0]
    assert not (tmp_path / "run").exists()
