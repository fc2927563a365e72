"""Out-of-core preparation: worker processes, bounded memory, the hub document cap, new keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.data.prepare as prep
from trainer.config.schema import TokenizerConfig
from trainer.data.tokenizer import train_bpe

from .test_prepare import VAL_EVERY, cfg_for, decoded_documents, make_paragraphs

FILES = ["train.bin", "val.bin", "train.idx", "val.idx", "tokenizer/tokenizer.json", "meta.json"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    paragraphs = make_paragraphs(400)
    for part in range(4):
        (directory / f"{part}.txt").write_text("\n\n".join(paragraphs[part::4]))
    return directory


def test_output_identical_with_1_and_2_workers(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)  # many chunks, so ordering across workers is exercised
    one = prep.prepare(cfg_for(tmp_path / "one", [corpus], num_proc=1), log=lambda _: None)
    two = prep.prepare(cfg_for(tmp_path / "two", [corpus], num_proc=2), log=lambda _: None)
    assert one.directory.name == two.directory.name  # the cache key ignores the worker count
    for name in FILES:
        assert (one.directory / name).read_bytes() == (two.directory / name).read_bytes(), name
    assert one.train_tokens == two.train_tokens > 0


MEMORY_SCRIPT = """
import json, resource, sys
import psutil, torch, datasets  # imported up front: only the preparation's own growth is measured
from transformers import PreTrainedTokenizerFast
import trainer.data.prepare as prep
from trainer.config.schema import DataConfig, TokenizerConfig
prep.CHUNK_CHARS = 1 << 16
cfg = DataConfig(name="m", source="files", paths=[sys.argv[1]], cache_dir=sys.argv[2], num_proc=2,
                 tokenizer=TokenizerConfig(source=sys.argv[3]))
before = psutil.Process().memory_info().rss
prepared = prep.prepare(cfg, log=lambda _: None, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"main": peak - before, "tokens": prepared.train_tokens}))
"""


def _prepare_growth(tmp_path: Path, parts: int) -> tuple[int, dict]:
    """Prepare ``parts`` ~1 MB files in a fresh process; (corpus bytes, its peak RSS growth)."""
    corpus = tmp_path / f"corpus{parts}"
    corpus.mkdir()
    paragraphs = make_paragraphs(2000)
    tokenizer = tmp_path / "tokenizer.json"
    if not tokenizer.exists():
        train_bpe(paragraphs, 400).save(str(tokenizer))
    text = "\n\n".join(paragraphs)
    size = 0
    for part in range(parts):
        block = "\n\n".join(f"{part}.{i} {text[i * 997 % 5000 :]}" for i in range(8))
        (corpus / f"{part}.txt").write_text(block)
        size += len(block.encode())
    cache = tmp_path / f"cache{parts}"
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(corpus), str(cache), str(tokenizer)],
        capture_output=True,
        text=True,
        check=True,
    )
    return size, json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """20x the corpus (1 -> 20 MB), about the same peak in the reading/writing process: ~64 KB chunks
    stream through it (each worker holds the chunk it tokenizes). Either run grows by a fixed 10-30 MB
    (worker pool and its threads, tokenizer copies)."""
    small_size, small = _prepare_growth(tmp_path, 1)
    big_size, big = _prepare_growth(tmp_path, 20)
    assert big_size > 18e6 and big["tokens"] > 15 * small["tokens"]
    # Observed: +0.4 MB for +6.8 MB of corpus (8 parts), with a few MB of run-to-run noise (malloc arenas of
    # the pool's threads), so the margin must be well above that; the old pipeline grew by more than the
    # corpus (documents + an Arrow copy).
    assert big["main"] < small["main"] + (big_size - small_size) / 2, (small, big)


def test_hub_document_cap_is_max_documents(tmp_path):
    paragraphs = make_paragraphs(60)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    cfg = cfg_for(tmp_path, [path], source="hub", hub_name="json", max_documents=24, num_proc=2)
    prepared = prep.prepare(cfg, log=lambda _: None)
    assert decoded_documents(prepared, "val") == paragraphs[VAL_EVERY - 1 : 24 : VAL_EVERY]
    assert len(decoded_documents(prepared, "train")) == 24 - 24 // VAL_EVERY


def _bpe_model(prepared) -> dict:
    return json.loads((prepared.tokenizer_dir / "tokenizer.json").read_text())["model"]


def test_tokenizer_train_bytes_fits_the_bpe_on_an_even_sample(tmp_path, corpus):
    corpus_bytes = sum(f.stat().st_size for f in corpus.iterdir())
    capped = cfg_for(tmp_path, [corpus], tokenizer=TokenizerConfig(vocab_size=400, train_bytes=corpus_bytes // 4))
    everything = cfg_for(tmp_path, [corpus], tokenizer=TokenizerConfig(vocab_size=400, train_bytes=0))
    assert prep.bpe_sample_fraction(capped, corpus_bytes // 4) == pytest.approx(0.25, rel=1e-3)
    assert prep.cache_directory(capped) != prep.cache_directory(everything)
    train_docs = list(prep._Corpus(capped).train_documents())
    sample = list(prep.bpe_sample(train_docs, corpus_bytes // 4, prep.bpe_sample_fraction(capped, corpus_bytes // 4)))
    # About a quarter of the training text, taken from every quarter of the corpus, not only the first.
    kept = sum(map(len, sample)) / sum(map(len, train_docs))
    assert 0.2 < kept <= 0.25
    positions = {doc: i for i, doc in enumerate(train_docs)}
    quarters = {4 * positions[doc] // len(train_docs) for doc in sample}
    assert quarters == {0, 1, 2, 3}
    assert _bpe_model(prep.prepare(capped, log=lambda _: None)) == json.loads(train_bpe(sample, 400).to_str())["model"]


def test_a_train_bytes_budget_above_the_corpus_changes_nothing(tmp_path, corpus):
    big = cfg_for(tmp_path, [corpus], tokenizer=TokenizerConfig(vocab_size=400, train_bytes=1 << 30))
    everything = cfg_for(tmp_path, [corpus], tokenizer=TokenizerConfig(vocab_size=400, train_bytes=0))
    assert prep.bpe_sample_fraction(big, 1 << 30) == 1.0
    assert prep.cache_directory(big) == prep.cache_directory(everything)


def test_train_bytes_takes_the_first_bytes_of_a_stream_of_unknown_size():
    docs = ["ab", "cde", "fgh", "ij"]
    assert list(prep.bpe_sample(docs, 5, None)) == ["ab", "cde"]
    assert list(prep.bpe_sample(docs, 6, None)) == ["ab", "cde", "fgh"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_proc": -1}, "data.num_proc=-1"),
        ({"tokenizer": TokenizerConfig(train_bytes=-3)}, "data.tokenizer.train_bytes=-3"),
    ],
)
def test_bad_new_keys_refused_in_one_line(tmp_path, corpus, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        prep.prepare(cfg_for(tmp_path, [corpus], **overrides), log=lambda _: None)
    assert "\n" not in str(err.value)


def test_long_documents_are_encoded_in_pieces_with_the_ids_of_the_whole(tmp_path, monkeypatch):
    """Real code (the standard library's files, each one document) cut every ~100 characters before a space,
    tab or newline that follows a non-space character: the ids equal encoding each file whole."""
    files = prep.stdlib_files()[:40]
    docs = [text for text in map(prep._read_text, files) if text]
    # Prose, unicode, a literal EOT, and whitespace that Python and the tokenizer's regex may class apart.
    docs.append(" \u3000\xa0x\x1c y\t\r\n ".join(make_paragraphs(300)))
    tok = train_bpe(docs, 1000)
    assert prep.splits_exactly(json.loads(tok.to_str()))
    monkeypatch.setattr(prep, "PIECE_CHARS", 100)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 5000)  # many encode batches per chunk
    prep._init_worker(tok.to_str(), 0, 10**9, "uint16")  # no validation split: all ids in the first
    (ids, lengths), _ = prep._encode_chunk(0, docs)
    assert max(len(prep.pieces(doc, 100)) for doc in docs) > 100  # really cut
    tok.encode_special_tokens = True
    whole = [[*enc.ids, 0] for enc in tok.encode_batch(docs, add_special_tokens=False)]
    assert lengths.tolist() == [len(w) for w in whole]
    assert ids.tolist() == [i for w in whole for i in w]


def test_a_tokenizer_that_is_not_gpt2_byte_level_is_never_cut():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    assert not prep.splits_exactly(json.loads(Tokenizer(models.BPE()).to_str()))  # no pre-tokenizer
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not prep.splits_exactly(json.loads(metaspace.to_str()))
    normalized = train_bpe(["a b c"], 300)
    normalized.normalizer = normalizers.NFKC()
    assert not prep.splits_exactly(json.loads(normalized.to_str()))
    assert prep.pieces("ab\ncd ef", 1) == ["ab", "\ncd", " ef"] and prep.pieces("ab\x1ccd", 1) == ["ab\x1ccd"]
