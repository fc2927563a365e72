"""From a validated config to what the training loop reads: the prepared corpus (tokenized once per
machine, under a lock) and this rank's training stream and validation batches.

Both run before any process group exists, so an unusable corpus is bad input (exit code 2).
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from trainer.config.schema import BadInput, BatchPlan, Config, ConfigError


@contextmanager
def _exclusive(lock_path: Path):
    """Ranks of one machine prepare the corpus one after another; later ones find the cache."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(cfg: Config):
    from trainer.data.blend import prepare_blend
    from trainer.data.prepare import prepare
    from trainer.data.tokenizer import set_eot

    if cfg.data.source == "megatron":  # Megatron .bin/.idx files, read in place, not tokenized
        from trainer.data.indexed import prepare_megatron as prepare
    data = cfg.data
    try:
        set_eot(data.tokenizer.eot)  # the document separator for preparing, and for the rest of the run
    except ValueError as err:
        raise BadInput(str(err)) from None
    with _exclusive(Path(data.cache_dir) / ".prepare.lock"):
        try:
            prepared = prepare_blend(data, prepare) if data.blend else prepare(data)
        except ValueError as err:  # the data pipeline reports unusable corpora this way
            if isinstance(err, BadInput):
                raise
            raise BadInput(f"data error: {err}") from None
    if prepared.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"the tokenizer has {prepared.vocab_size} tokens; "
            "raise model.vocab_size or lower data.tokenizer.vocab_size",
        )
    return prepared


def _token_file(prepared, split: str):
    """The split's tokens: its whole file, or for a Megatron corpus (``token_file``) a range of its .bin."""
    from trainer.data.stream import TokenFile

    if hasattr(prepared, "token_file"):
        return prepared.token_file(split)
    return TokenFile(prepared.train_path if split == "train" else prepared.val_path, prepared.dtype)


def build_streams(cfg: Config, plan: BatchPlan, prepared, dp_rank: int, dp_size: int):
    """This rank's training stream and validation batches; a corpus too small for them is bad input."""
    from trainer.data.blend import BlendedData, BlendedStream, blended_eval_batches
    from trainer.data.stream import SampleStream, eval_batches

    train = (cfg.model.seq_len, plan.micro_batch, plan.grad_accum, dp_rank, dp_size, cfg.train.seed)
    val = (cfg.model.seq_len, plan.global_batch, plan.micro_batch, dp_rank, dp_size, cfg.train.eval_batches)
    try:
        if isinstance(prepared, BlendedData):
            files = {split: [_token_file(p, split) for p in prepared.sources] for split in ("train", "val")}
            stream = BlendedStream(files["train"], prepared.weights, *train)
            return stream, list(blended_eval_batches(files["val"], prepared.weights, *val))
        stream = SampleStream(_token_file(prepared, "train"), *train)
        return stream, list(eval_batches(_token_file(prepared, "val"), *val))
    except ValueError as err:
        raise BadInput(str(err)) from None
