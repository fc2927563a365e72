"""data.tokenizer.source=<path> reuses a tokenizer as is: a transformers-saved one with another end-of-text
token (data.tokenizer.eot), and an exported checkpoint's. The prepared ids equal that tokenizer's own
``encode(text, add_special_tokens=False)`` of every document, each followed by its end-of-text id."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.conftest import ROOT, child_env, compose_config, run_train, small_corpus, tiny_corpus_overrides
from trainer.config.schema import BadInput
from trainer.data import prepare as prep
from trainer.data.setup import prepare_data
from trainer.data.tokenizer import EOT, saved_eot, set_eot


@pytest.fixture(autouse=True)
def _default_eot():
    """prepare_data sets the end-of-text token for the process; later tests expect the default."""
    yield
    set_eot(EOT)


def _corpus(tmp_path, start: int, count: int):
    """Paragraphs ``start .. start + count`` of a small real corpus, as one text file."""
    paragraphs = small_corpus(tmp_path).read_text().split("\n\n")[start : start + count]
    path = tmp_path / f"corpus-{start}.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def _train_documents(cfg) -> list[str]:
    docs = [doc for doc in prep.iter_documents(cfg.data) if doc]
    return prep.split_documents(docs, cfg.data.val_fraction)[0]


def _expected_ids(encode, docs: list[str], eot: int) -> np.ndarray:
    return np.concatenate([np.array([*encode(doc), eot], dtype=np.int64) for doc in docs])


def _llama_style_tokenizer(directory, text: str):
    """A byte-level BPE whose documents end with ``</s>`` (no <|endoftext|>), saved by transformers."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(directory)
    return tok


def test_tokenizer_with_another_end_of_text_token(tmp_path, data_cache):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "llama-style"
    tok = _llama_style_tokenizer(tok_dir, _corpus(tmp_path, 0, 300).read_text())
    assert tok.token_to_id(EOT) is None
    corpus = _corpus(tmp_path, 300, 600)  # other text than it was trained on
    overrides = [
        "debug=smoke",
        "data=files",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={data_cache}",
        f"data.tokenizer.source={tok_dir}",
    ]
    with pytest.raises(BadInput) as err:  # the default <|endoftext|> is not in it
        prepare_data(compose_config(overrides)[0])
    assert "data.tokenizer.eot='<|endoftext|>'" in str(err.value) and "\n" not in str(err.value)

    overrides.append("data.tokenizer.eot='</s>'")
    cfg, _ = compose_config(overrides)
    assert cfg.data.tokenizer.eot == "</s>"
    prepared = prepare_data(cfg)
    eos = tok.token_to_id("</s>")
    assert prepared.eot_id == eos and prepared.vocab_size == tok.get_vocab_size()
    hf = AutoTokenizer.from_pretrained(tok_dir)
    docs = _train_documents(cfg)
    expected = _expected_ids(lambda d: hf.encode(d, add_special_tokens=False), docs, eos)
    ids = np.fromfile(prepared.train_path, dtype=prepared.dtype).astype(np.int64)
    assert len(ids) == len(expected) > 10_000 and (ids == expected).all()
    assert (ids == eos).sum() == len(docs)

    run_dir = tmp_path / "run"
    proc = run_train(run_dir, [*overrides, "train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = Tokenizer.from_file(str(run_dir / "checkpoints" / "step_2" / "tokenizer" / "tokenizer.json"))
    assert saved.encode(docs[0], add_special_tokens=False).ids == hf.encode(docs[0], add_special_tokens=False)
    assert AutoTokenizer.from_pretrained(run_dir / "checkpoints" / "step_2" / "tokenizer").eos_token == "</s>"
    assert saved_eot(run_dir / "checkpoints" / "step_2" / "tokenizer") == "</s>"
    # The exported model ends texts with </s> too (generate stops there).
    exported = tmp_path / "exported"
    export = [sys.executable, "-m", "trainer.export", str(run_dir / "checkpoints" / "step_2"), str(exported)]
    done = subprocess.run(export, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == eos


def test_training_with_an_exported_checkpoints_tokenizer(tmp_path, data_cache):
    from transformers import AutoTokenizer

    first = tmp_path / "first"
    proc = run_train(first, ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = tmp_path / "exported"
    export = [sys.executable, "-m", "trainer.export", str(first / "checkpoints" / "step_1"), str(exported)]
    done = subprocess.run(export, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    corpus = _corpus(tmp_path, 1000, 500)  # text the tokenizer was not fitted to, first docs excepted
    overrides = [
        "debug=smoke",
        "data=files",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={data_cache}",
        f"data.tokenizer.source={exported}",
    ]
    second = tmp_path / "second"
    proc = run_train(second, [*overrides, "train.steps=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained byte-level BPE" not in proc.stdout and f"loading tokenizer {exported}" in proc.stdout

    cfg, _ = compose_config(overrides)
    prepared = prepare_data(cfg)  # the cache the second run prepared
    hf = AutoTokenizer.from_pretrained(exported)
    docs = _train_documents(cfg)
    expected = _expected_ids(lambda d: hf.encode(d, add_special_tokens=False), docs, hf.convert_tokens_to_ids(EOT))
    ids = np.fromfile(prepared.train_path, dtype=prepared.dtype).astype(np.int64)
    assert len(ids) == len(expected) > 10_000 and (ids == expected).all()
    same = Tokenizer.from_file(str(second / "checkpoints" / "step_1" / "tokenizer" / "tokenizer.json"))
    assert (
        same.to_str()
        == Tokenizer.from_file(str(first / "checkpoints" / "step_1" / "tokenizer" / "tokenizer.json")).to_str()
    )
