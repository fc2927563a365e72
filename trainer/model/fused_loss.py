"""The output head and the cross entropy in one pass over chunks of tokens, never holding the whole logits.

Unfused, a micro-batch's head keeps its (tokens, V) logits, or a tp rank's (tokens, V/tp) shard, in fp32
for the loss's backward, and that backward writes a second tensor of the same size: for gpt3-1.3b's
50,304-entry vocabulary at 2 × 2048 tokens 0.8 GB each, for Llama 3's 128,256 entries 2.1 GB. Here each
chunk of ``chunk`` tokens computes its logits, the loss, and at once its gradients (as Liger-Kernel's and
torchtune's chunked losses do):

    z = x_c Wᵀ                      (chunk, V/tp), in fp32 for the softmax statistics
    loss_i = log Σ_v exp(z_iv - m_i) - (z_it - m_i)                    (m_i: the row max)
    g = softmax(z) - onehot(t)      in place of z; cast to the logits' dtype as the unfused backward does
    dx_c = g W / N,   dW += gᵀ x_c / N                                 (N: tokens; the loss is their mean)

and backward only scales the stored dx and dW by the incoming gradient. What stays from forward to backward
is dx (tokens, h) and dW (V/tp, h): no tensor has the vocabulary as one side and the tokens as the other.
The softmax needs each row's max, target logit and sum of exponentials over the whole vocabulary: under
tensor parallelism ``reduce`` sums (or maxes) them over the vocabulary shards, as
``trainer.parallel.loss`` does, and a rank's dx covers its shard only (the caller's mapping sums it).
Padding rows of the vocabulary get -inf logits (``mask_padding``), as in the unfused head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.model.layers import mask_padding

# Bytes of one chunk's fp32 logits: the chunk size in tokens follows from the vocabulary a rank holds.
LOSS_CHUNK_BYTES = 64 * 2**20

# reduce(tensor, "max" | "sum") reduces in place over the vocabulary's shards (identity on one device).
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def _local(tensor: torch.Tensor, _op: str) -> torch.Tensor:
    return tensor


def chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within ``LOSS_CHUNK_BYTES``."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_local))


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, head, vocab_start, reduce, grads):
        n, vocab_local = x.shape[0], weight.shape[0]
        dx = torch.empty_like(x) if grads else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        step = chunk_tokens(vocab_local)
        for start in range(0, n, step):
            x_c, t_c = x[start : start + step], targets[start : start + step] - vocab_start
            z = mask_padding((x_c @ weight.t()).float(), head, vocab_start)  # (chunk, V/tp)
            in_shard = (t_c >= 0) & (t_c < vocab_local)
            t_c = t_c.masked_fill(~in_shard, 0).unsqueeze(1)
            z.sub_(reduce(z.max(dim=1).values, "max").unsqueeze(1))  # the max cancels: no gradient through it
            target = reduce(z.gather(1, t_c).squeeze(1).masked_fill(~in_shard, 0.0), "sum")
            sum_exp = reduce(z.exp_().sum(dim=1), "sum")
            total += (sum_exp.log() - target).sum()
            if grads:  # the 1/n of the mean goes into the products (a pass over (chunk, h), not (chunk, V/tp))
                z.mul_(sum_exp.reciprocal_().unsqueeze(1)).scatter_add_(1, t_c, -in_shard.unsqueeze(1).to(z.dtype))
                g = z.to(x.dtype)
                torch.mm(g, weight, out=dx[start : start + step]).div_(n)
                if g.dtype == dw.dtype:
                    dw.addmm_(g.t(), x_c, alpha=1 / n)
                else:  # a 16-bit product per chunk, summed in fp32
                    dw.add_((g.t() @ x_c).float(), alpha=1 / n)
        if grads:
            ctx.save_for_backward(dx, dw.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss.to(dx.dtype), dw * grad_loss.to(dw.dtype), None, None, None, None, None


def chunked_head_cross_entropy(
    x: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    vocab_start: int = 0,
    reduce: Reduce = _local,
) -> torch.Tensor:
    """Mean token cross entropy of the head ``head`` (its ``weight``: (V, h), or rows vocab_start.. of it under
    tensor parallelism) applied to ``x`` (B, T, h), against ``targets`` (B, T): the unfused
    ``cross_entropy(lm_logits(x, head), targets)`` computed chunk by chunk. ``reduce`` combines the vocabulary
    shards' row statistics (``Reduce``)."""
    weight = head.weight
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # evaluation computes none
    return _ChunkedHeadCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten(), head, vocab_start, reduce, grads)
