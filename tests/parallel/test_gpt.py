"""The whole GPT with tensor (and sequence) parallelism against the single-device GPT.

Same seed, same batch: the gathered logits, the loss and the gathered gradient of every parameter
must equal the dense model's at tp=2 and tp=4, with and without sequence parallelism.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from conftest import CLOSE
from trainer.model import GPT, DenseLayers, ModelShape
from trainer.parallel.layers import (
    TensorParallelLayers,
    allreduce_sequence_parallel_grads,
    register_sequence_parallel_grad_hooks,
)
from trainer.parallel.mappings import CommStats, all_gather

from .spawn import run_ranks

pytestmark = pytest.mark.multiproc

SHAPE = ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=16, vocab_size=128)
SEED, BATCH = 7, 2


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _gathered(tensor: torch.Tensor, param: torch.nn.Parameter, group) -> torch.Tensor:
    """The full value of ``tensor``, a shard of ``param`` or of its gradient (replicated: as is)."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    return all_gather(tensor, param.partition_dim, group, CommStats())


def _check_gpt(rank: int, world: int) -> None:
    group = dist.group.WORLD
    idx, targets = _batch()
    dense = GPT(SHAPE, DenseLayers(), SEED)
    logits_ref = dense(idx)
    loss_ref = dense(idx, targets)
    loss_ref.backward()
    dense_params = dict(dense.named_parameters())

    with pytest.raises(ValueError, match=f"n_head={world // 2} must be divisible by the tensor-parallel size"):
        GPT(replace(SHAPE, n_head=world // 2), TensorParallelLayers(group), SEED)

    for sequence_parallel in (False, True):
        for via_hooks in (False, True) if sequence_parallel else (False,):
            stats = CommStats()
            model = GPT(SHAPE, TensorParallelLayers(group, stats, sequence_parallel), SEED)
            if via_hooks:
                register_sequence_parallel_grad_hooks(model, group, stats)
            case = f"tp={world} sp={sequence_parallel} hooks={via_hooks}"

            logits = model(idx)  # (B, T, V/tp)
            assert logits.shape == (BATCH, SHAPE.seq_len, SHAPE.vocab_size // world)
            torch.testing.assert_close(_gathered_logits(logits, group), logits_ref, **CLOSE, msg=case)

            loss = model(idx, targets)
            torch.testing.assert_close(loss, loss_ref, **CLOSE, msg=case)
            loss.backward()
            if sequence_parallel and not via_hooks:
                allreduce_sequence_parallel_grads(model, group, stats)

            names = [name for name, _ in model.named_parameters()]
            assert names == list(dense_params), case
            for name, param in model.named_parameters():
                ref = dense_params[name]
                torch.testing.assert_close(_gathered(param.detach(), param, group), ref.detach(), atol=0, rtol=0)
                torch.testing.assert_close(
                    _gathered(param.grad, param, group),
                    ref.grad,
                    **CLOSE,
                    msg=lambda m, where=f"{case} {name}": f"{where}: {m}",
                )


def _gathered_logits(logits: torch.Tensor, group) -> torch.Tensor:
    return all_gather(logits.detach(), -1, group, CommStats())


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_matches_dense(tp):
    run_ranks(_check_gpt, tp)


def test_tp1_provider_is_the_dense_model():
    """A group of one (here: no process group at all) reduces every mapping to the identity."""
    idx, targets = _batch()
    dense = GPT(SHAPE, DenseLayers(), SEED)
    model = GPT(SHAPE, TensorParallelLayers(group=None, sequence_parallel=True), SEED)
    for m in (dense, model):
        m(idx, targets).backward()
    for (name, p), (_, ref) in zip(model.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-6, rtol=0, msg=name)
    assert model.layers.stats.kinds() == []
