"""The model's sizes and what follows from them alone: padded vocabulary and parameter counts.

Torch-free and config-free, so the model, the trainer, the comparison report, the planner and the tests
read one definition. Letters as in the papers: l layers, h hidden, a heads, s sequence, V vocabulary,
t tensor-parallel degree.

Pipeline positions (as ``trainer.parallel.pipeline`` cuts the GPT): 0 the embedding (V·h token rows,
s·h positions), 1..l the blocks, l+1 the final LayerNorm (2h), l+2 the output head tied to the token
embedding -- a second copy of V·h/t when the head sits on another stage than the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Activation recompute in backward (Korthikanti et al. 2022): none | selective (the attention core) |
# full (everything but each recomputed run's input).
RECOMPUTE = ("none", "selective", "full")


def padded_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of tp·multiple (Megatron-LM's rule): every tp rank then
    holds an equal, ``multiple``-aligned slice of the embedding."""
    step = tp * multiple
    return -(-vocab_size // step) * step


@dataclass(frozen=True)
class ModelShape:
    n_layer: int  # l: transformer blocks
    n_embd: int  # h: hidden size
    n_head: int  # a: attention heads
    seq_len: int  # s: context length (learned positions)
    vocab_size: int  # V: embedding rows (``padded(tp)`` gives the rows a tp layout builds)
    dropout: float = 0.0
    vocab_multiple: int = 1  # the embedding is padded to a multiple of this times tp
    name: str = ""

    @classmethod
    def from_config(cls, model: Any) -> ModelShape:
        """From a ``trainer.config.schema.ModelConfig`` (or anything with its field names)."""
        m = model
        return cls(
            m.n_layer, m.n_embd, m.n_head, m.seq_len, m.vocab_size, m.dropout, m.make_vocab_size_divisible_by, m.name
        )

    def padded_vocab(self, tp: int = 1) -> int:
        return padded_vocab(self.vocab_size, tp, self.vocab_multiple)

    def padded(self, tp: int = 1) -> ModelShape:
        """The shape a layout of tensor-parallel degree ``tp`` builds: the vocabulary padded for it."""
        return replace(self, vocab_size=self.padded_vocab(tp), vocab_multiple=1)

    def block_params(self, tp: int = 1) -> float:
        """One block on one tp rank: QKV (3h² + 3h) and fc1 (4h² + 4h) split by columns, the attention
        projection and fc2 (h² and 4h²) split by rows with their biases (h each) replicated, and two
        LayerNorms (2h each) replicated: 12h²/t + 7h/t + 6h. At t = 1 this is 12h² + 13h."""
        h = self.n_embd
        return (12 * h * h + 7 * h) / tp + 6 * h

    def rank_params(self, tp: int = 1, positions: range | None = None) -> float:
        """Parameters one rank holds for the pipeline ``positions`` it runs (default: the whole model),
        with the vocabulary as it stands (pad first with ``padded``)."""
        l, h, V, s = self.n_layer, self.n_embd, self.vocab_size, self.seq_len
        positions = range(l + 3) if positions is None else positions
        total = 0.0
        for pos in positions:
            if pos == 0:
                total += V * h / tp + s * h
            elif pos <= l:
                total += self.block_params(tp)
            elif pos == l + 1:
                total += 2 * h
            elif 0 not in positions:  # the head's own copy of the tied embedding
                total += V * h / tp
        return total

    def params(self, tp: int = 1) -> int:
        """The whole model as a tp layout builds it (padded vocabulary, tied head counted once):
        Narayanan et al.'s count plus the final LayerNorm's 2h."""
        return int(self.padded(tp).rank_params())

    def stage_params(self, tp: int, pp: int, first: bool, last: bool) -> float:
        """One rank of a stage of an even split of the blocks over ``pp`` stages: ``first`` adds the
        embedding, ``last`` the final LayerNorm and the head (a middle stage holds its blocks only)."""
        per_stage = self.n_layer // pp
        lo = 0 if first else 1 + (self.n_layer - per_stage if last else 0)
        hi = self.n_layer + 3 if last else lo + per_stage + (1 if first else 0)
        return self.padded(tp).rank_params(tp, range(lo, hi))

    def largest_tensor(self, tp: int = 1, embedding: bool = True) -> float:
        """Elements of the largest single parameter on one tp rank: the vocabulary embedding on a stage
        that holds it (V·h/t, padded), else an MLP weight (4h²/t)."""
        mlp = 4 * self.n_embd * self.n_embd / tp
        return max(mlp, self.padded_vocab(tp) * self.n_embd / tp) if embedding else mlp

    def narayanan_params(self) -> int:
        """P = 12·l·h²·(1 + 13/(12h) + (V+s)/(12·l·h)) (Narayanan et al. 2021, eq. 2), in integers;
        it leaves out the final LayerNorm (2h)."""
        l, h = self.n_layer, self.n_embd
        return 12 * l * h * h + 13 * l * h + (self.vocab_size + self.seq_len) * h
