"""Training and evaluation samples read from memory-mapped token files.

A sample is ``seq_len + 1`` consecutive tokens starting at ``i * seq_len``: the inputs are its first
``seq_len`` tokens and the targets its last ``seq_len``. Consecutive samples share one token, so the
file's N tokens give ``(N - 1) // seq_len`` samples and every token is a target once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), int64, (micro_batch, seq_len) each


class TokenFile:
    """Read-only view of a ``.bin`` file of token ids (a flat array of ``dtype``)."""

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        if self.path.stat().st_size == 0:  # np.memmap cannot map an empty file
            raise ValueError(f"data: token file {self.path} is empty; prepare the data again")
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def num_samples(self, seq_len: int) -> int:
        return max(0, (len(self) - 1) // seq_len)

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """Tokens ``[i * seq_len, (i + 1) * seq_len]`` (inclusive) as int64, shape (seq_len + 1,)."""
        if not 0 <= i < self.num_samples(seq_len):
            raise IndexError(
                f"sample {i} out of range: {self.path} has {self.num_samples(seq_len)} of seq_len {seq_len}"
            )
        start = i * seq_len
        return self.tokens[start : start + seq_len + 1].astype(np.int64)


def make_batch(tokens: TokenFile, indices: Sequence[int], seq_len: int) -> Batch:
    """Stack samples ``indices`` into (x, y): int64, shape (len(indices), seq_len), y[:, t] = x[:, t + 1]."""
    rows = torch.from_numpy(np.stack([tokens.sample(int(i), seq_len) for i in indices]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# Fields a saved position only makes sense with: they fix the sample order and the step boundaries.
_ORDER_FIELDS = ("seed", "seq_len", "global_batch", "num_samples")
# A position inside an optimizer step also depends on how the step is split into ranks and micro-batches.
_SPLIT_FIELDS = ("micro_batch", "dp_size")


class SampleStream:
    """Shuffled training micro-batches for one data-parallel rank, resumable at any micro-batch.

    Epoch ``e`` visits the samples in the order ``np.random.default_rng([seed, e]).permutation``,
    cut to whole global batches of G = micro_batch * grad_accum * dp_size samples (the tail is
    dropped). Optimizer step k of the epoch uses ``perm[k*G:(k+1)*G]``; rank r takes the contiguous
    share ``[r*G/dp_size, (r+1)*G/dp_size)`` as grad_accum micro-batches in order. So the samples of a
    step depend on G alone, not on how it is split into ranks and micro-batches.
    """

    def __init__(
        self,
        tokens: TokenFile,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        start_step: int = 0,
    ):
        if min(seq_len, micro_batch, grad_accum, dp_size) < 1 or not 0 <= dp_rank < dp_size or seed < 0:
            raise ValueError(
                f"SampleStream: need seq_len, micro_batch, grad_accum, dp_size >= 1, 0 <= dp_rank < dp_size "
                f"and seed >= 0; got {seq_len}, {micro_batch}, {grad_accum}, {dp_size}, {dp_rank}, {seed}"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = micro_batch * grad_accum * dp_size
        self.num_samples = tokens.num_samples(seq_len)
        self.steps_per_epoch = self.num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: corpus has {self.num_samples} samples of seq_len+1={seq_len + 1} tokens, fewer than one "
                f"global batch {self.global_batch}; use a larger corpus or a smaller parallel.global_batch / "
                "model.seq_len"
            )
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.seek(start_step)

    @property
    def step(self) -> int:
        """Optimizer steps completed since the start of epoch 0."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def seek(self, step: int) -> None:
        """Move to the first micro-batch of optimizer step ``step`` (counted over all epochs)."""
        if step < 0:
            raise ValueError(f"SampleStream.seek: step must be >= 0, got {step}")
        self.epoch, self.step_in_epoch = divmod(step, self.steps_per_epoch)
        self.micro = 0  # micro-batches of the current step already returned

    def next_micro_batch(self) -> Batch:
        """This rank's next micro-batch (x, y): int64, (micro_batch, seq_len) each."""
        batch = make_batch(self.tokens, self.next_indices(), self.seq_len)
        self.micro += 1
        if self.micro == self.grad_accum:
            self.seek(self.step + 1)
        return batch

    def next_indices(self) -> np.ndarray:
        """Sample indices the next ``next_micro_batch`` returns, shape (micro_batch,); does not advance."""
        share = self.global_batch // self.dp_size
        start = self.step_in_epoch * self.global_batch + self.dp_rank * share + self.micro * self.micro_batch
        return self._permutation()[start : start + self.micro_batch]

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), self.epoch
        return self._perm

    def state_dict(self) -> dict[str, int]:
        """The position (the same on every rank) plus the fields it is only valid with; JSON-able."""
        position = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "micro": self.micro}
        return position | {name: getattr(self, name) for name in _ORDER_FIELDS + _SPLIT_FIELDS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position. At a step boundary the rank/micro-batch split may differ."""
        fields = _ORDER_FIELDS + (_SPLIT_FIELDS if state.get("micro") else ())
        for name in fields:
            if state.get(name) != getattr(self, name):
                raise ValueError(
                    f"data: cannot resume the sample stream: it was saved with {name}={state.get(name)} but this "
                    f"run has {name}={getattr(self, name)}; resume with the same data, seed and batch shape"
                )
        self.seek(state["epoch"] * self.steps_per_epoch + state["step_in_epoch"])
        self.micro = state["micro"]


def eval_batches(
    tokens: TokenFile, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, num_batches: int
) -> Iterator[Batch]:
    """Rank ``dp_rank``'s share of the validation set: the first ``num_batches * global_batch`` samples of
    ``tokens`` in file order (wrapping around the end of a file shorter than that), as Megatron-LM's eval
    iterations. A split with fewer samples than one global batch is refused.

    The set depends only on the global batch, so every layout (any dp, micro-batch or accumulation)
    validates on the same samples and reports the same loss. Each global batch is cut into dp contiguous
    shares, rank r taking samples ``b * global_batch + r * share + [0, share)`` of batch b, in
    micro-batches. Same batches every call.
    """
    num_samples = tokens.num_samples(seq_len)
    if num_samples < global_batch:  # a validation batch would repeat its own samples
        raise ValueError(
            f"data: the validation split has {num_samples} samples of seq_len+1={seq_len + 1} tokens, fewer than one "
            f"global batch {global_batch}; raise data.val_fraction, use a larger corpus or a smaller "
            "parallel.global_batch / model.seq_len"
        )
    indices = np.arange(num_batches * global_batch) % num_samples
    shares = indices.reshape(num_batches, dp_size, -1)[:, dp_rank]  # (batches, global_batch / dp)
    micro = shares.reshape(-1, micro_batch)  # this rank's micro-batches, batch by batch
    # A generator expression, not a generator function, so the check above fails at the call.
    return (make_batch(tokens, rows, seq_len) for rows in micro)
