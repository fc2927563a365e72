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
from functools import lru_cache
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


# How the pipeline's n_layer + 3 positions are cut into stages. "parameters" and "uniform" are DeepSpeed's
# ``PipelineModule(partition_method=...)`` (the trainer's ``parallel.pipeline_partition``; "parameters" is its
# default); "even" is Megatron-LM's: l/p blocks per stage, the embedding on the first, the final norm and head on
# the last (p must divide l).
PIPELINE_PARTITIONS = ("parameters", "uniform")  # what parallel.pipeline_partition accepts
STAGE_CUTS = (*PIPELINE_PARTITIONS, "even")


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``runtime.utils.partition_uniform`` (0.19): ``num_parts + 1`` boundaries, each part
    ``num_items // num_parts`` items and the first ``num_items % num_parts`` parts one more."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: list[float], num_parts: int) -> list[int]:
    """DeepSpeed's ``runtime.utils.partition_balanced`` (0.19), the same result: contiguous parts chosen by
    dynamic programming to minimise (heaviest part - lightest part), ties going to the last split point it
    tries; its inner loop over split points is vectorised here (the same float64 arithmetic)."""
    import numpy as np

    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    inf = np.inf
    dp_max, dp_min, dp_cost = np.full((n + 1, m + 1), inf), np.full((n + 1, m + 1), inf), np.full((n + 1, m + 1), inf)
    position = np.zeros((n + 1, m + 1), dtype=int)
    dp_max[0, 0] = dp_cost[0, 0] = 0
    for i in range(1, n + 1):
        segment = prefix[i] - prefix[:i]  # the last part = items k..i-1, for every k < i
        for j in range(1, min(i, m) + 1):
            max_sum = np.maximum(dp_max[:i, j - 1], segment)
            min_sum = np.minimum(dp_min[:i, j - 1], segment)
            cost = max_sum - min_sum
            # DeepSpeed keeps k when dp_cost >= cost while scanning k upwards: the last k of least cost.
            k = i - 1 - int(np.argmin(cost[::-1]))
            dp_cost[i, j], dp_max[i, j], dp_min[i, j], position[i, j] = cost[k], max_sum[k], min_sum[k], k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(int(position[parts[-1], j]))
    return parts[::-1]


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
    # The vocabulary before ``padded`` added rows (0: no padding): logits of rows from here on are -inf, so
    # padding stays out of the softmax and of any argmax (trainer.model.layers.mask_padding).
    real_vocab: int = 0

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
        """The shape a layout of tensor-parallel degree ``tp`` builds: the vocabulary padded for it (the rows
        before the padding kept as ``real_vocab``)."""
        real = self.real_vocab or self.vocab_size
        return replace(self, vocab_size=self.padded_vocab(tp), vocab_multiple=1, real_vocab=real)

    def unpadded_params(self) -> int:
        """The whole model with its vocabulary as given, no padding rows: what papers and Hugging Face count
        (``params`` adds the (padded V - V)·h rows of ``model.make_vocab_size_divisible_by``)."""
        return int(replace(self, vocab_size=self.real_vocab or self.vocab_size).rank_params())

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
        """One rank of a stage of an even split of the blocks over ``pp`` stages (Megatron-LM's; "even" of
        ``stage_bounds``): ``first`` adds the embedding, ``last`` the final LayerNorm and the head (a middle stage
        holds its blocks only). ``stages`` gives any partition's positions, ``rank_params`` their count."""
        per_stage = self.n_layer // pp
        lo = 0 if first else 1 + (self.n_layer - per_stage if last else 0)
        hi = self.n_layer + 3 if last else lo + per_stage + (1 if first else 0)
        return self.padded(tp).rank_params(tp, range(lo, hi))

    def layer_params(self, tp: int = 1) -> list[int]:
        """Parameters one tp rank builds at each of the n_layer + 3 pipeline positions (padded vocabulary; the
        tied head's copy counted): what DeepSpeed's ``PipelineModule._count_layer_params`` counts."""
        padded = self.padded(tp)
        return [round(padded.rank_params(tp, range(pos, pos + 1))) for pos in range(self.n_layer + 3)]

    def stage_bounds(self, tp: int, pp: int, method: str = "parameters") -> list[int]:
        """The pp + 1 position boundaries of the stages: stage i runs positions [b[i], b[i+1]). "parameters"
        and "uniform" as DeepSpeed's partitioner cuts the trainer's layer specs, "even" as Megatron-LM does."""
        l = self.n_layer
        if method == "even":
            if l % pp:
                raise ValueError(f"an even split needs pp={pp} to divide n_layer={l}")
            return [0] + [1 + (i + 1) * (l // pp) for i in range(pp - 1)] + [l + 3]
        if method == "uniform":
            return partition_uniform(l + 3, pp)
        if method == "parameters":
            return list(_balanced(tuple(self.layer_params(tp)), pp))
        raise ValueError(f"partition method {method!r}: must be one of {STAGE_CUTS}")

    def stages(self, tp: int, pp: int, method: str = "parameters") -> list[range]:
        """Each stage's pipeline positions (``stage_bounds`` as ranges)."""
        bounds = self.stage_bounds(tp, pp, method)
        return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

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


@lru_cache(maxsize=4096)
def _balanced(weights: tuple[int, ...], parts: int) -> tuple[int, ...]:
    return tuple(partition_balanced(list(weights), parts))
