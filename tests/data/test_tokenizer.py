import pytest

from conftest import SHAKESPEARE, english_text, small_corpus
from trainer.data.prepare import stdlib_files
from trainer.data.tokenizer import EOT, eot_id, load_tokenizer, save_tokenizer, train_bpe

VOCAB = 2048

AWKWARD_TEXTS = [
    "",
    " ",
    "  leading spaces and trailing   ",
    "def f(x):\n\tif x:\n\t\treturn  x\r\n\n\n    pass\n",
    "\u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c\u8a9e \U0001f600\U0001f469\u200d\U0001f4bb"
    " e\u0301 \u05e9\u05dc\u05d5\u05dd",
    "nul\x00byte \x7f and \ufffd replacement",
    "a" * 5000,
    "word.   , ; x=  1",
]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> str:
    """Real English text; the standard-library sample where ../shared/data is not beside the checkout."""
    return english_text() if SHAKESPEARE.is_file() else small_corpus(tmp_path_factory.mktemp("corpus")).read_text()


@pytest.fixture(scope="module")
def stdlib_sources() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:300]]


@pytest.fixture(scope="module")
def tok(shakespeare, stdlib_sources):
    # About 1.5 MB: half of Shakespeare plus the first stdlib files; the rest is held out below.
    return train_bpe([shakespeare[: len(shakespeare) // 2], *stdlib_sources[:100]], VOCAB)


def round_trips(tok, text: str) -> bool:
    return tok.decode(tok.encode(text).ids) == text


def test_vocabulary_and_eot(tok):
    assert tok.get_vocab_size() == VOCAB
    assert eot_id(tok) == tok.token_to_id(EOT)
    assert tok.encode(EOT).ids == [eot_id(tok)]


def test_round_trip_shakespeare(tok, shakespeare):
    assert round_trips(tok, shakespeare)
    # Compression shows the merges were learned, not just the byte alphabet.
    bytes_per_token = len(shakespeare.encode()) / len(tok.encode(shakespeare).ids)
    assert bytes_per_token > 2


def test_round_trip_held_out_stdlib_source(tok, stdlib_sources):
    held_out = stdlib_sources[200:]
    assert sum(map(len, held_out)) > 300_000
    assert all(round_trips(tok, text) for text in held_out)


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_round_trip_awkward_text(tok, text):
    assert round_trips(tok, text)


def test_saved_tokenizer_loads_in_transformers(tok, shakespeare, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = shakespeare[:5000] + "".join(AWKWARD_TEXTS)
    ids = tok.encode(text).ids
    assert hf(text)["input_ids"] == ids  # no BOS/EOS added
    assert hf.decode(ids) == text
    assert hf.eos_token_id == eot_id(tok)
    assert load_tokenizer(tmp_path).encode(text).ids == ids
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text).ids == ids


def test_load_tokenizer_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer.source"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    with pytest.raises(ValueError, match="data.tokenizer.source"):
        load_tokenizer(tmp_path / "nope.json")


def test_train_bpe_rejects_vocab_without_room_for_eot():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 256)
