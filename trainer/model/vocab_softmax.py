"""Softmax cross entropy over one shard of the vocabulary: the one home of its formula.

A rank holds the logits z[:, v] for v in its slice [start, start + V_local) of the vocabulary (all of it on
one device). For each token with target t:

    loss = log Σ_v exp(z_v - m) - (z_t - m),   m = max_v z_v

Three row statistics span the whole vocabulary: the max m, the target logit z_t - m (only the shard that owns
t contributes it) and the sum of exponentials. ``reduce`` combines each over the shards (under tensor
parallelism an all-reduce over the tp group, ``trainer.parallel.loss.tp_reduce``; on one device the identity),
so this module knows no process groups. The gradient is local:

    dloss/dz_v = softmax(z)_v - [v == t]

Padding rows of the vocabulary arrive with -inf logits (``trainer.model.layers.mask_padding``): they are in no
softmax, and a shard of padding only contributes a max of -inf and no exponentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# reduce(tensor, "max" | "sum") reduces ``tensor`` in place over the vocabulary's shards and returns it.
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def local_reduce(tensor: torch.Tensor, _op: str) -> torch.Tensor:
    """The ``Reduce`` of a vocabulary on one device: nothing to combine."""
    return tensor


class ShardSoftmax(NamedTuple):
    loss: torch.Tensor  # (...,) per-token cross entropy
    exp: torch.Tensor  # (..., V_local) exp(z - m): a new tensor, which ``minus_onehot_`` turns into the gradient
    sum_exp: torch.Tensor  # (...,) over the whole vocabulary
    target: torch.Tensor  # (..., 1) the target's index in this shard (0 where another shard owns it)
    in_shard: torch.Tensor  # (...,) whether this shard owns the target

    def minus_onehot_(self) -> torch.Tensor:
        """softmax(z) - onehot(t), in place of ``exp``: the gradient of ``loss`` with respect to z."""
        onehot = -self.in_shard.unsqueeze(-1).to(self.exp.dtype)
        return self.exp.div_(self.sum_exp.unsqueeze(-1)).scatter_add_(-1, self.target, onehot)


def shard_softmax(z: torch.Tensor, targets: torch.Tensor, start: int, reduce: Reduce = local_reduce) -> ShardSoftmax:
    """The cross entropy of fp32 logits ``z`` (..., V_local), this shard's vocabulary from ``start`` on, against
    ``targets`` (...) in [0, V). ``z`` is left as it is. Every shard calls ``reduce`` in the same order (max,
    target logit, sum), as collectives require."""
    vocab_local = z.shape[-1]
    local = targets - start
    in_shard = (local >= 0) & (local < vocab_local)
    local = local.masked_fill(~in_shard, 0).unsqueeze(-1)
    # The max only stabilises the exponentials and cancels from the loss, so it takes no gradient.
    shifted = z - reduce(z.max(dim=-1).values, "max").unsqueeze(-1)
    target_logit = reduce(shifted.gather(-1, local).squeeze(-1).masked_fill(~in_shard, 0.0), "sum")
    exp = shifted.exp_()
    sum_exp = reduce(exp.sum(dim=-1), "sum")
    return ShardSoftmax(sum_exp.log() - target_logit, exp, sum_exp, local, in_shard)
