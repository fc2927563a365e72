"""Tensor-parallel (Megatron-style) layers and the provider that hands them to the GPT.

Each layer allocates only this rank's shard and owns the init hooks ``GPT.init_weights`` calls:
``full_param_shape(name)`` (the unsharded shape the initialiser draws) and
``shard_param(name, full)`` (this rank's cut of it), so the gathered weights are the same at any tp.
Weights use ``nn.Linear``'s convention W = Aᵀ of shape (out, in): Y = XA + b = XWᵀ + b.

Sharded parameters carry Megatron's attributes ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; DeepSpeed's gradient-norm code reads the first to count every shard once and
replicated parameters on tp rank 0 only. Under sequence parallelism, replicated parameters that
only see this rank's sequence chunk need their gradients summed over the tp group:
``allreduce_sequence_parallel_grads`` (after backward) or ``register_sequence_parallel_grad_hooks``
(during backward).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.hooks import RemovableHandle

from trainer.model.fused_loss import chunked_head_cross_entropy
from trainer.model.layers import NORM_TYPES, mask_padding
from trainer.parallel.loss import tp_reduce, vocab_parallel_cross_entropy
from trainer.parallel.mappings import (
    CommStats,
    all_gather_seq,
    all_reduce,
    copy_to_tp,
    gather_from_seq,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_seq,
    scatter_to_seq,
    split,
)


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} must be divisible by the tensor-parallel size {tp}")
    return n // tp


class _ShardedModule(nn.Module):
    """A module whose parameters are each either split along one dimension over ``group`` or
    replicated; implements the init hooks for all of them."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats):
        super().__init__()
        self.group, self.stats = group, stats
        self.tp_size = group_size(group)
        self._full_shapes: dict[str, torch.Size] = {}
        self._split_dims: dict[str, int | None] = {}

    def _add_param(self, name: str, full_shape: Sequence[int], split_dim: int | None, what: str) -> None:
        shape = list(full_shape)
        if split_dim is not None:
            shape[split_dim] = _divide(shape[split_dim], self.tp_size, what)
        param = nn.Parameter(torch.empty(shape))
        if split_dim is not None:
            param.tensor_model_parallel = True
            param.partition_dim = split_dim
            param.partition_stride = 1
        self.register_parameter(name, param)
        self._full_shapes[name] = torch.Size(full_shape)
        self._split_dims[name] = split_dim

    def full_param_shape(self, name: str) -> torch.Size:
        return self._full_shapes[name]

    def shard_param(self, name: str, full: torch.Tensor) -> torch.Tensor:
        dim = self._split_dims[name]
        return full if dim is None else split(full, dim, self.group)


class ColumnParallelLinear(_ShardedModule):
    """Y = XA + b with A split along its second dimension (output features): A = [A_1, ..., A_tp].

    Rank i computes Y_i = X A_i + b_i, of shape (B, T, out/tp); weight shard (out/tp, in), bias
    shard (out/tp). The input X is replicated: it enters through ``copy_to_tp`` (backward sums the
    ranks' partial dX), or under sequence parallelism arrives as (B, T/tp, in) and is all-gathered
    along the sequence (backward reduce-scatters dX). ``gather_output`` all-gathers Y along the
    features to the full (B, T, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup,
        stats: CommStats,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        bias: bool = True,
    ):
        super().__init__(group, stats)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self._add_param("weight", (out_features, in_features), 0, "out_features")
        if bias:
            self._add_param("bias", (out_features,), 0, "out_features")
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enter = all_gather_seq if self.sequence_parallel else copy_to_tp
        y = F.linear(enter(x, self.group, self.stats), self.weight, self.bias)  # (B, T, out/tp)
        return gather_from_tp(y, self.group, self.stats) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp_size}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(_ShardedModule):
    """Y = XA + b with A split along its first dimension (input features): A = [A_1; ...; A_tp].

    The input arrives split along its last dimension, X = [X_1, ..., X_tp], as a column-parallel
    layer leaves it. Rank i computes the partial product X_i A_i; Y = Σ_i X_i A_i + b is an
    all-reduce, or under sequence parallelism a reduce-scatter to (B, T/tp, out). Weight shard
    (out, in/tp); the bias is replicated and added once, after the reduction. Under sequence
    parallelism it is added to this rank's chunk only, so it is tagged ``sequence_parallel``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup,
        stats: CommStats,
        sequence_parallel: bool = False,
        bias: bool = True,
    ):
        super().__init__(group, stats)
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self._add_param("weight", (out_features, in_features), 1, "in_features")
        if bias:
            self._add_param("bias", (out_features,), None, "out_features")
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (B, T, out), this rank's term of the sum
        leave = reduce_scatter_seq if self.sequence_parallel else reduce_from_tp
        out = leave(partial, self.group, self.stats)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp_size}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(_ShardedModule):
    """E[ids] with the table E (V, d) split along the vocabulary: rank i holds rows
    [i·V/tp, (i+1)·V/tp).

    Each rank looks up the ids in its slice, writes zeros for the others, and an all-reduce sums the
    (B, T, d) results, of which exactly one is non-zero per token. Backward is local: each rank's
    rows receive the gradient of the tokens they own.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup, stats: CommStats):
        super().__init__(group, stats)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._add_param("weight", (num_embeddings, embedding_dim), 0, "num_embeddings (padded vocabulary)")
        self.vocab_start = group_rank(group) * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start  # (B, T)
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, d)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group, self.stats)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}"


class TensorParallelLayers:
    """``LayerProvider`` of Megatron tensor parallelism over ``group``, optionally with sequence
    parallelism (Korthikanti et al. 2022).

    Without sequence parallelism activations between blocks are replicated, (B, T, h) on every
    rank. With it they are split along the sequence, (B, T/tp, h), so LayerNorm, dropout and the
    residual adds work on 1/tp of the tokens; the column layers all-gather the sequence and the row
    layers reduce-scatter it, moving the same bytes as the all-reduces they replace.

    The output head (tied to the vocab-parallel embedding, or its own matrix split the same way) gives
    ``lm_logits`` this rank's vocabulary shard (B, T, V/tp) and ``cross_entropy`` never materialises the full logits.
    Every collective is recorded in ``stats`` (a fresh ``CommStats`` unless one is passed).
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats | None = None, sequence_parallel: bool = False):
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        self.sequence_parallel = sequence_parallel
        self.tp_size = group_size(group)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, dim, self.group, self.stats)

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return ColumnParallelLinear(
            in_features, out_features, self.group, self.stats, sequence_parallel=self.sequence_parallel, bias=bias
        )

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return RowParallelLinear(
            in_features, out_features, self.group, self.stats, sequence_parallel=self.sequence_parallel, bias=bias
        )

    def head(self, vocab_size: int, dim: int) -> nn.Module:
        """The untied output head, vocabulary-split like the embedding; ``lm_logits`` uses its weight, after
        ``from_block_layout`` has gathered the sequence (so the layer's own input mapping is not used)."""
        return ColumnParallelLinear(dim, vocab_size, self.group, self.stats, bias=False)

    def to_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h) replicated -> (B, T/tp, h) under sequence parallelism (backward all-gathers)."""
        return scatter_to_seq(x, self.group, self.stats) if self.sequence_parallel else x

    def from_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/tp, h) -> (B, T, h) under sequence parallelism. Backward only splits: the gradient
        arriving from ``lm_logits`` has already been summed over the tp group."""
        return gather_from_seq(x, self.group, self.stats) if self.sequence_parallel else x

    def lm_logits(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """(B, T, h) -> (B, T, V/tp): x times this rank's rows of the head (the tied embedding), transposed.

        A column-parallel product: each rank's dx covers only its vocabulary slice, so x enters
        through ``copy_to_tp`` and backward sums them.
        """
        logits = F.linear(copy_to_tp(x, self.group, self.stats), head.weight)
        return mask_padding(logits, head, group_rank(self.group) * logits.shape[-1])

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.group, self.stats).mean()

    def fused_head_loss(self, x: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        """The chunked head and loss over this rank's vocabulary rows; the row statistics are reduced over
        the tp group, and x enters through ``copy_to_tp`` as in ``lm_logits`` (backward sums the ranks' dx)."""
        start = group_rank(self.group) * head.weight.shape[0]
        x = copy_to_tp(x, self.group, self.stats)
        return chunked_head_cross_entropy(x, head, targets, start, tp_reduce(self.group, self.stats))


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters that, under sequence parallelism, see only this rank's sequence chunk:
    every norm's weight and bias (the GPT applies all of its norms between
    ``to_block_layout`` and ``from_block_layout``) and parameters tagged ``sequence_parallel``
    (the row-parallel biases). Each rank's gradient of them is a partial sum over the tokens.
    """
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or getattr(param, "sequence_parallel", False):
                params[id(param)] = param
    return list(params.values())


def allreduce_sequence_parallel_grads(model: nn.Module, group: dist.ProcessGroup, stats: CommStats) -> None:
    """Sum the ``.grad`` of ``sequence_parallel_params`` over the tp group, after backward.

    One all-reduce per dtype of a flat buffer rather than one per parameter: these tensors are
    small (h elements each), so the cost is latency. For the plain torch loop and ZeRO stage 0;
    ZeRO 1-3 consume gradients during backward -- use ``register_sequence_parallel_grad_hooks``.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    for param in sequence_parallel_params(model):
        if param.grad is not None:
            buckets[(param.grad.dtype, param.grad.device)].append(param.grad)
    for grads in buckets.values():
        flat = all_reduce(_flatten_dense_tensors(grads), group, stats)
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)


def register_sequence_parallel_grad_hooks(
    model: nn.Module, group: dist.ProcessGroup, stats: CommStats
) -> list[RemovableHandle]:
    """Sum each backward's gradient of ``sequence_parallel_params`` over the tp group before it
    is accumulated into ``.grad``, so it composes with gradient accumulation and with DeepSpeed's
    ZeRO hooks, which run after accumulation. One small all-reduce per parameter per backward."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce(grad.clone(), group, stats)  # the incoming grad may be shared

    return [param.register_hook(hook) for param in sequence_parallel_params(model)]
