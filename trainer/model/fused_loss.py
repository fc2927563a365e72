"""The output head and the cross entropy in one pass over chunks of tokens, never holding the whole logits.

Unfused, a micro-batch's head keeps its (tokens, V) logits, or a tp rank's (tokens, V/tp) shard, in fp32
for the loss's backward, and that backward writes a second tensor of the same size: for gpt3-1.3b's
50,304-entry vocabulary at 2 × 2048 tokens 0.8 GB each, for Llama 3's 128,256 entries 2.1 GB. Here each
chunk of ``chunk`` tokens computes its logits, the loss, and at once its gradients (as Liger-Kernel's and
torchtune's chunked losses do):

    z = x_c Wᵀ                      (chunk, V/tp), in fp32 for the softmax statistics
    loss_i, g = softmax(z) - onehot(t)                                 (``trainer.model.vocab_softmax``)
    dx_c = g W / N,   dW += gᵀ x_c / N                                 (N: tokens; the loss is their mean)

and backward only scales the stored dx and dW by the incoming gradient. What stays from forward to backward
is dx (tokens, h) and dW (V/tp, h): no tensor has the vocabulary as one side and the tokens as the other.
g is cast to the logits' dtype as the unfused backward does. Under tensor parallelism ``reduce`` combines the
softmax's row statistics over the vocabulary shards, and a rank's dx covers its shard only (the caller's
mapping sums it).
Padding rows of the vocabulary get -inf logits (``mask_padding``), as in the unfused head.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.model.layers import mask_padding
from trainer.model.vocab_softmax import Reduce, local_reduce, shard_softmax

# Bytes of one chunk's fp32 logits: the chunk size in tokens follows from the vocabulary a rank holds.
LOSS_CHUNK_BYTES = 64 * 2**20


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
            x_c = x[start : start + step]
            z = mask_padding((x_c @ weight.t()).float(), head, vocab_start)  # (chunk, V/tp)
            soft = shard_softmax(z, targets[start : start + step], vocab_start, reduce)
            del z  # the logits are past use: only their exponentials go on
            total += soft.loss.sum()
            if grads:  # the 1/n of the mean goes into the products (a pass over (chunk, h), not (chunk, V/tp))
                g = soft.minus_onehot_().to(x.dtype)
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
    reduce: Reduce = local_reduce,
) -> torch.Tensor:
    """Mean token cross entropy of the head ``head`` (its ``weight``: (V, h), or rows vocab_start.. of it under
    tensor parallelism) applied to ``x`` (B, T, h), against ``targets`` (B, T): the unfused
    ``cross_entropy(lm_logits(x, head), targets)`` computed chunk by chunk. ``reduce`` combines the vocabulary
    shards' row statistics (``Reduce``)."""
    weight = head.weight
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # evaluation computes none
    return _ChunkedHeadCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten(), head, vocab_start, reduce, grads)
