"""The model's sizes and architecture choices, and what follows from them alone: padded vocabulary and
parameter counts.

Torch-free and config-free, so the model, the trainer, the comparison report, the planner and the tests
read one definition. Letters as in the papers: l layers, h hidden, a heads, s sequence, V vocabulary,
t tensor-parallel degree; k key/value heads, d = h/a head size, f the MLP's inner size.

One schema covers both families the trainer builds: GPT-2/3 (LayerNorm, GELU MLP of 4h, learned
positions, biases, head tied to the embedding -- the defaults) and Llama-style models (RMSNorm, SwiGLU,
rotary positions, grouped-query attention with k < a, no biases, an untied head).

Pipeline positions (as ``trainer.parallel.pipeline`` cuts the model): 0 the embedding (V·h token rows,
s·h learned positions), 1..l the blocks, l+1 the final norm, l+2 the output head -- tied to the token
embedding (a second copy of V·h/t when the head sits on another stage than the embedding) or its own
V·h/t matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

# Activation recompute in backward (Korthikanti et al. 2022): none | selective (the attention core) |
# full (everything but each recomputed run's input).
RECOMPUTE = ("none", "selective", "full")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")  # GPT-2's tanh GELU MLP | Llama's SiLU-gated MLP (three matrices)
POSITIONS = ("learned", "rope")  # learned position embeddings | rotary embeddings of q and k
SWIGLU_MULTIPLE = 256  # Llama's ``multiple_of``: the SwiGLU inner size is rounded up to it


def swiglu_hidden(n_embd: int, multiple: int = SWIGLU_MULTIPLE) -> int:
    """Llama's SwiGLU inner size: 2/3 of 4h (the same weights as a 4h GELU MLP), rounded up to ``multiple``."""
    return multiple * math.ceil(int(8 * n_embd / 3) / multiple)


def default_ffn_hidden(n_embd: int, mlp: str) -> int:
    return swiglu_hidden(n_embd) if mlp == "swiglu" else 4 * n_embd


def padded_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of tp·multiple (Megatron-LM's rule): every tp rank then
    holds an equal, ``multiple``-aligned slice of the embedding."""
    step = tp * multiple
    return -(-vocab_size // step) * step


# The architecture fields a checkpoint records beside the sizes (meta.json "model"); older checkpoints,
# which lack them, are GPT-2 models (the defaults).
ARCH_FIELDS = ("n_kv_head", "ffn_hidden", "mlp", "norm", "norm_eps", "position", "rope_theta", "bias", "tie_embeddings")
SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int  # l: transformer blocks
    n_embd: int  # h: hidden size
    n_head: int  # a: attention (query) heads
    seq_len: int  # s: context length
    vocab_size: int  # V: embedding rows (``padded(tp)`` gives the rows a tp layout builds)
    dropout: float = 0.0
    vocab_multiple: int = 1  # the embedding is padded to a multiple of this times tp
    name: str = ""
    n_kv_head: int = 0  # k: key/value heads (grouped-query attention); 0 = n_head (multi-head attention)
    ffn_hidden: int = 0  # f: the MLP's inner size; 0 = 4h (gelu) or ``swiglu_hidden(h)`` (swiglu)
    mlp: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True  # biases in every linear layer and LayerNorm
    tie_embeddings: bool = True  # the output head is the token embedding

    @classmethod
    def from_config(cls, model: Any) -> ModelShape:
        """From a ``trainer.config.schema.ModelConfig`` (or anything with its field names)."""
        m = model
        arch = {key: getattr(m, key) for key in ARCH_FIELDS if hasattr(m, key)}
        arch = {key: value for key, value in arch.items() if value is not None}
        return cls(
            m.n_layer, m.n_embd, m.n_head, m.seq_len, m.vocab_size, m.dropout, m.make_vocab_size_divisible_by, m.name,
            **arch,
        )  # fmt: skip

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records of the model (meta.json "model"): sizes and architecture, with the
        "0 = rule" sizes resolved."""
        meta = {key: getattr(self, key) for key in (*SIZE_FIELDS, *ARCH_FIELDS)}
        return {**meta, "n_kv_head": self.kv_heads, "ffn_hidden": self.ffn_size}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ModelShape:
        """Inverse of ``meta``; architecture fields a checkpoint lacks take the GPT-2 defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in meta.items() if key in known})

    @property
    def kv_heads(self) -> int:
        """k: key/value heads (``n_kv_head``, or n_head when it is 0)."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        """f: the MLP's inner size (``ffn_hidden``, or the MLP's rule when it is 0)."""
        return self.ffn_hidden or default_ffn_hidden(self.n_embd, self.mlp)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qkv_features(self) -> int:
        """Output features of the fused QKV projection: a query heads plus k key and k value heads, d each."""
        return (self.n_head + 2 * self.kv_heads) * self.head_dim

    def padded_vocab(self, tp: int = 1) -> int:
        return padded_vocab(self.vocab_size, tp, self.vocab_multiple)

    def padded(self, tp: int = 1) -> ModelShape:
        """The shape a layout of tensor-parallel degree ``tp`` builds: the vocabulary padded for it."""
        return replace(self, vocab_size=self.padded_vocab(tp), vocab_multiple=1)

    def block_weights(self) -> int:
        """Elements of one block's weight matrices (the matmul work per token): QKV (a+2k)·d·h, the attention
        projection h², the MLP (2 or 3)·f·h. For GPT (k = a, f = 4h) this is 12h²."""
        h, f = self.n_embd, self.ffn_size
        return self.qkv_features * h + h * h + self._mlp_matrices() * f * h

    def _mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    def norm_params(self) -> int:
        """One LayerNorm (weight and bias: 2h; h without biases) or RMSNorm (h)."""
        return 2 * self.n_embd if self.norm == "layernorm" and self.bias else self.n_embd

    def replicated_vectors(self) -> tuple[int, int]:
        """The h-element parameters every tp rank holds whole, as (per block, final norm): a block's two norms
        (weight and bias each for LayerNorm with biases, the weight alone otherwise) and, with biases, the two
        row-parallel layers' biases. GPT (6, 2); Llama (2, 1). Under sequence parallelism each one's gradient
        is all-reduced over the tp group."""
        per_norm = self.norm_params() // self.n_embd
        return 2 * per_norm + (2 if self.bias else 0), per_norm

    def block_params(self, tp: int = 1) -> float:
        """One block on one tp rank: the column-parallel QKV and MLP input layers with their biases, split;
        the attention projection and the MLP output layer split by rows with their biases (h each)
        replicated; two norms replicated. GPT: 12h²/t + 7h/t + 6h (12h² + 13h at t = 1)."""
        h, f = self.n_embd, self.ffn_size
        column_bias = self.qkv_features + (self._mlp_matrices() - 1) * f if self.bias else 0
        row_bias = 2 * h if self.bias else 0
        return (self.block_weights() + column_bias) / tp + row_bias + 2 * self.norm_params()

    def rank_params(self, tp: int = 1, positions: range | None = None) -> float:
        """Parameters one rank holds for the pipeline ``positions`` it runs (default: the whole model),
        with the vocabulary as it stands (pad first with ``padded``)."""
        l, h, V, s = self.n_layer, self.n_embd, self.vocab_size, self.seq_len
        positions = range(l + 3) if positions is None else positions
        total = 0.0
        for pos in positions:
            if pos == 0:
                total += V * h / tp + (s * h if self.position == "learned" else 0)
            elif pos <= l:
                total += self.block_params(tp)
            elif pos == l + 1:
                total += self.norm_params()
            elif not self.tie_embeddings or 0 not in positions:  # an untied head, or the tied one's copy
                total += V * h / tp
        return total

    def params(self, tp: int = 1) -> int:
        """The whole model as a tp layout builds it (padded vocabulary, a tied head counted once). For GPT,
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
        """Elements of the largest single parameter on one tp rank: the vocabulary embedding (or head) on a
        stage that holds it (V·h/t, padded), else a weight of the MLP (f·h/t; the fused SwiGLU input 2f·h/t)."""
        mlp = (self._mlp_matrices() - 1) * self.ffn_size * self.n_embd / tp
        return max(mlp, self.padded_vocab(tp) * self.n_embd / tp) if embedding else mlp

    def narayanan_params(self) -> int:
        """P = 12·l·h²·(1 + 13/(12h) + (V+s)/(12·l·h)) (Narayanan et al. 2021, eq. 2), in integers;
        it leaves out the final LayerNorm (2h). Defined for the GPT architecture only."""
        l, h = self.n_layer, self.n_embd
        return 12 * l * h * h + 13 * l * h + (self.vocab_size + self.seq_len) * h
