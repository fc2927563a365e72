"""Vocab-parallel cross entropy against F.cross_entropy on the gathered logits.

Given finite logits in the padding columns the function treats them as ordinary softmax entries (Megatron-LM's
choice); the model's heads hand it -inf there (trainer.model.layers.mask_padding), which leaves padding out of the
loss, even on a shard of padding only.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import CLOSE
from trainer.model.shape import padded_vocab
from trainer.parallel.loss import vocab_parallel_cross_entropy
from trainer.parallel.mappings import CommStats

from .spawn import run_ranks

B, T = 3, 5


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, padded",
    [(100, 4, 2, 104), (128, 4, 1, 128), (50257, 2, 128, 50432), (50257, 1, 1, 50257), (7, 8, 1, 8)],
)
def test_padded_vocab(vocab, tp, divisible_by, padded):
    assert padded_vocab(vocab, tp, divisible_by) == padded
    assert padded % (tp * divisible_by) == 0 and padded - vocab < tp * divisible_by


def _check_cross_entropy(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for vocab, divisible_by in ((128, 1), (100, 2)):
        padded = padded_vocab(vocab, world, divisible_by)
        gen = torch.Generator().manual_seed(vocab)
        full = 4 * torch.randn(B, T, padded, generator=gen)
        full[0, 0] += 1000.0  # large logits: the max shift must keep exp() finite
        targets = torch.randint(0, vocab, (B, T), generator=gen)
        targets[0, :world] = torch.arange(world) * (padded // world)  # every shard owns some target

        ref_in = full.clone().requires_grad_()
        ref = F.cross_entropy(ref_in.flatten(0, 1), targets.flatten(), reduction="none").view(B, T)
        ref.mean().backward()

        stats = CommStats()
        shard = full.chunk(world, -1)[rank].clone().requires_grad_()
        per_token = vocab_parallel_cross_entropy(shard, targets, group, stats)
        torch.testing.assert_close(per_token, ref.detach(), **CLOSE)
        per_token.mean().backward()
        torch.testing.assert_close(shard.grad, ref_in.grad.chunk(world, -1)[rank], **CLOSE)
        if padded > vocab and rank == world - 1:  # the padding columns live on the last shard
            assert (shard.grad[..., vocab - padded :] > 0).all()
        # max, target logit and sum of exponentials: one all-reduce of (B, T) each, none backward.
        assert stats.kinds() == ["all_reduce"]
        assert (stats["all_reduce"].count, stats["all_reduce"].elements) == (3, 3 * B * T)

    # Half-precision logits: statistics in fp32, gradient back in the logits' dtype.
    shard = (full.chunk(world, -1)[rank]).to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, group, CommStats())
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert shard.grad.dtype == torch.bfloat16


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_matches_dense(tp):
    run_ranks(_check_cross_entropy, tp)


def _check_masked_padding(rank: int, world: int) -> None:
    """60 real rows padded to 128 over 4 ranks: shards 2 and 3 are all padding. The loss and gradient are the
    unpadded softmax's; the padding gets no gradient and nothing turns NaN."""
    from trainer.model.layers import mask_padding

    vocab, padded = 60, padded_vocab(60, world, 32)
    gen = torch.Generator().manual_seed(1)
    full = 4 * torch.randn(B, T, padded, generator=gen)
    targets = torch.randint(0, vocab, (B, T), generator=gen)
    ref_in = full[..., :vocab].clone().requires_grad_()
    ref = F.cross_entropy(ref_in.flatten(0, 1), targets.flatten(), reduction="none").view(B, T)
    ref.mean().backward()

    head = torch.nn.Module()
    head.real_vocab = vocab
    shard = full.chunk(world, -1)[rank].clone().requires_grad_()
    local = padded // world
    masked = mask_padding(shard.clone(), head, rank * local)
    per_token = vocab_parallel_cross_entropy(masked, targets, dist.group.WORLD, CommStats())
    torch.testing.assert_close(per_token, ref.detach(), **CLOSE)
    per_token.mean().backward()
    want = torch.zeros_like(shard)
    real = max(0, min(local, vocab - rank * local))
    want[..., :real] = ref_in.grad[..., rank * local : rank * local + real]
    torch.testing.assert_close(shard.grad, want, **CLOSE)


@pytest.mark.multiproc
def test_masked_padding_is_out_of_the_vocab_parallel_loss():
    run_ranks(_check_masked_padding, 4)
