"""Byte-level BPE tokenizer: train it on a corpus, save it for HF tools, load it back.

Byte-level means the 256 byte values are the base alphabet, so every string is encodable without
an unknown token and ``decode(encode(text)) == text`` holds exactly (no normalizer, no prefix space).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # the default end-of-text token; it separates documents in the token stream
TOKENIZER_FILE = "tokenizer.json"
# The end-of-text token in force (``data.tokenizer.eot``): ``train_bpe`` adds it and ``eot_id`` looks it up.
_EOT: contextvars.ContextVar[str] = contextvars.ContextVar("eot", default=EOT)


def set_eot(token: str) -> None:
    """Use ``token`` as the document separator from now on in this thread (a run sets it once)."""
    if not token:
        raise ValueError("data.tokenizer.eot='': name the tokenizer's end-of-text token, e.g. <|endoftext|> or </s>")
    _EOT.set(token)


def current_eot() -> str:
    return _EOT.get()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Fit a byte-level BPE on ``texts`` (one document each).

    ``vocab_size`` counts the 256 byte tokens, EOT and the learned merges; a small corpus may stop
    short of it, so read the real size from ``tok.get_vocab_size()``.
    """
    if vocab_size <= 256:
        raise ValueError(f"data.tokenizer.vocab_size={vocab_size}: must be > 256 (256 bytes + EOT)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[current_eot()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token in force (default ``<|endoftext|>``, see ``set_eot``); a tokenizer
    without it cannot mark document boundaries."""
    eot = current_eot()
    token_id = tok.token_to_id(eot)
    if token_id is None:
        raise ValueError(
            f"data.tokenizer.eot={eot!r}: the tokenizer has no such token; set data.tokenizer.eot to its "
            "end-of-text token (e.g. </s>, <|end_of_text|>) or use data.tokenizer.source=train"
        )
    return token_id


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    The result loads with ``load_tokenizer(directory)`` and, offline, with
    ``transformers.AutoTokenizer.from_pretrained(directory)`` (same ids, EOT as eos/bos/unk).
    """
    # transformers is slow to import and only needed here.
    from transformers import PreTrainedTokenizerFast

    eot = tok.id_to_token(eot_id(tok))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eot,
        bos_token=eot,
        unk_token=eot,
        # The default clean-up rewrites " ." to "." on decode, which breaks the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    directory = Path(directory)
    wrapped.save_pretrained(directory)
    return directory


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside an HF tokenizer directory."""
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(
            f"data.tokenizer.source={str(source)!r}: no {TOKENIZER_FILE} there; "
            "use 'train', a tokenizer.json file or a directory holding one"
        )
    return Tokenizer.from_file(str(path))


def saved_eot(source: str | Path) -> str:
    """The end-of-text token a saved tokenizer declares: the ``eos_token`` of the ``tokenizer_config.json``
    beside its ``tokenizer.json`` (a checkpoint's, an exported model's), else ``<|endoftext|>``."""
    import json

    path = Path(source)
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return EOT
    if isinstance(eos, dict):  # {"content": "</s>", ...} in some transformers versions
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else EOT
