"""Cross entropy over vocabulary-sharded logits, without gathering them.

Rank r holds the logits z[:, v] for v in its vocabulary slice [r·V/tp, (r+1)·V/tp). For each token
with target t:

    loss = log Σ_v exp(z_v) - z_t = log Σ_v exp(z_v - m) - (z_t - m),   m = max_v z_v

The three global quantities are each one all-reduce of a (B, T) tensor over the tp group: the max
m (MAX), the target logit z_t - m (SUM; only the rank that owns t contributes it) and the sum of
exponentials (SUM). No rank ever holds more than its (B, T, V/tp) shard. Backward is local:

    dloss/dz_v = softmax(z)_v - [v == t]

Padding rows of the embedding (``trainer.model.shape.padded_vocab``) arrive with -inf logits (``lm_logits`` masks
them, ``trainer.model.layers.mask_padding``): they are in no softmax, so the loss is the unpadded model's at any tp.
A shard of padding only contributes a max of -inf and no exponentials.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.parallel.mappings import CommStats, all_reduce, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, stats):
        x = logits.float()  # (B, T, V/tp); softmax statistics in fp32 whatever the logits' dtype
        vocab_local = x.shape[-1]
        # The max only stabilises the exponentials and cancels from the loss, so it takes no gradient.
        shifted = x - all_reduce(x.max(dim=-1).values, group, stats, op=dist.ReduceOp.MAX).unsqueeze(-1)

        local_target = targets - group_rank(group) * vocab_local  # (B, T)
        in_shard = (local_target >= 0) & (local_target < vocab_local)
        local_target = local_target.masked_fill(~in_shard, 0).unsqueeze(-1)  # (B, T, 1)
        target_logit = shifted.gather(-1, local_target).squeeze(-1).masked_fill(~in_shard, 0.0)
        target_logit = all_reduce(target_logit, group, stats)

        exp = shifted.exp_()  # (B, T, V/tp), reuses ``shifted``'s storage
        sum_exp = all_reduce(exp.sum(dim=-1), group, stats)  # (B, T)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_shard)
        ctx.input_dtype, ctx.consumed = logits.dtype, False
        return sum_exp.log() - target_logit  # (B, T)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("vocab-parallel cross entropy: backward ran twice through the same graph")
        ctx.consumed = True
        softmax, local_target, in_shard = ctx.saved_tensors
        # In place on the saved softmax, (B, T, V/tp) fp32, rather than allocating a second one.
        grad = softmax.scatter_add_(-1, local_target, -in_shard.unsqueeze(-1).to(softmax.dtype))
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
