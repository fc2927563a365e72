"""Cross entropy over vocabulary-sharded logits, without gathering them.

Rank r holds the logits of its vocabulary slice [r·V/tp, (r+1)·V/tp); the formula and its three row
statistics are ``trainer.model.vocab_softmax``'s, each one all-reduce of a (B, T) tensor over the tp group
(``tp_reduce``). No rank ever holds more than its (B, T, V/tp) shard, and backward is local.

Padding rows of the embedding (``trainer.model.shape.padded_vocab``) arrive with -inf logits (``lm_logits`` masks
them, ``trainer.model.layers.mask_padding``): they are in no softmax, so the loss is the unpadded model's at any tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.model.vocab_softmax import Reduce, ShardSoftmax, shard_softmax
from trainer.parallel.mappings import CommStats, all_reduce, group_rank

_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def tp_reduce(group: dist.ProcessGroup, stats: CommStats) -> Reduce:
    """The vocabulary shards' ``Reduce``: an all-reduce over the tp group, counted in ``stats``."""
    return lambda tensor, op: all_reduce(tensor, group, stats, op=_OPS[op])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, stats):
        # Softmax statistics in fp32 whatever the logits' dtype.
        soft = shard_softmax(logits.float(), targets, group_rank(group) * logits.shape[-1], tp_reduce(group, stats))
        ctx.save_for_backward(soft.exp, soft.sum_exp, soft.target, soft.in_shard)
        ctx.input_dtype, ctx.consumed = logits.dtype, False
        return soft.loss  # (B, T)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("vocab-parallel cross entropy: backward ran twice through the same graph")
        ctx.consumed = True
        exp, sum_exp, target, in_shard = ctx.saved_tensors
        # In place on the saved (B, T, V/tp) fp32 exponentials rather than allocating a second tensor.
        grad = ShardSoftmax(None, exp, sum_exp, target, in_shard).minus_onehot_()
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup, stats: CommStats
) -> torch.Tensor:
    """Per-token cross entropy (B, T) of vocab-sharded logits (B, T, V/tp) against targets (B, T).

    Shard r of the logits must cover the vocabulary slice [r·V/tp, (r+1)·V/tp), as
    ``VocabParallelEmbedding`` and ``TensorParallelLayers.lm_logits`` produce. Targets must be in
    [0, V); one outside every shard would silently count as a zero target logit.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group, stats)
