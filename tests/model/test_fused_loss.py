"""The chunked head + cross entropy (``speed.fused_loss``, trainer.model.fused_loss) against the unfused head and
loss of the same model: the loss and every parameter's gradient, dense and at tp 2 / 4 (with and without sequence
parallelism), GPT-2 (tied head, padded vocabulary) and Llama (untied head), over several chunks with a ragged last
one; fp32 to rounding, bf16 to its own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from parallel.spawn import run_ranks

import trainer.model.fused_loss as fused_loss
from conftest import CLOSE
from trainer.model import GPT, DenseLayers, ModelShape
from trainer.parallel.layers import TensorParallelLayers, allreduce_sequence_parallel_grads
from trainer.parallel.mappings import CommStats

LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False, n_kv_head=4)
# 500 entries padded to 512: the padding rows' logits are -inf, in no softmax, and get no gradient.
SHAPES = {
    "gpt2": ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=16, vocab_size=500, vocab_multiple=128),
    "llama": ModelShape(n_layer=2, n_embd=64, n_head=8, seq_len=16, vocab_size=500, vocab_multiple=128, **LLAMA),
}
CHUNK_TOKENS = 5  # 3 x 16 tokens: ten chunks, the last of 3


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(fused_loss, "LOSS_CHUNK_BYTES", 4 * 512 * CHUNK_TOKENS)


def _batch(shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, shape.real_vocab or shape.vocab_size, (3, shape.seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: GPT, idx, targets, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(idx, targets)
    loss.backward()
    if group is not None and model.layers.sequence_parallel:
        allreduce_sequence_parallel_grads(model, group, CommStats())
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, CLOSE), (torch.bfloat16, {"atol": 2e-3, "rtol": 2e-2})])
@pytest.mark.parametrize("name", SHAPES)
def test_dense_fused_loss_equals_the_unfused_head_and_loss(name, dtype, tol):
    shape = SHAPES[name].padded()
    assert fused_loss.chunk_tokens(shape.vocab_size) == CHUNK_TOKENS
    unfused = GPT(shape, DenseLayers(), seed=3).to(dtype)
    fused = copy.deepcopy(unfused)
    fused.fused_loss = True
    idx, targets = _batch(shape)
    loss_ref, grads_ref = _loss_and_grads(unfused, idx, targets)
    loss, grads = _loss_and_grads(fused, idx, targets)
    torch.testing.assert_close(loss, loss_ref, **tol)
    for param_name, grad in grads.items():
        torch.testing.assert_close(grad.float(), grads_ref[param_name].float(), **tol, msg=param_name)
    head = fused.lm_head if name == "llama" else fused.wte
    assert head.weight.grad[shape.real_vocab :].abs().max() == 0  # padding rows: no gradient
    with torch.no_grad():  # evaluation: the same loss, no gradients computed or kept
        torch.testing.assert_close(fused(idx, targets), loss_ref, **tol)


def test_backward_scales_the_stored_gradients_by_the_incoming_one():
    shape = SHAPES["gpt2"].padded()
    unfused = GPT(shape, DenseLayers(), seed=3)
    fused = copy.deepcopy(unfused)
    fused.fused_loss = True
    idx, targets = _batch(shape)
    (unfused(idx, targets) * 2.5).backward()
    (fused(idx, targets) * 2.5).backward()  # as a loss scale or 1/accumulation steps would
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **CLOSE, msg=name)


def _check_tensor_parallel(rank: int, world: int, name: str) -> None:
    fused_loss.LOSS_CHUNK_BYTES = 4 * 512 // world * CHUNK_TOKENS  # the same chunks as dense (V/tp per rank)
    group = dist.group.WORLD
    shape = SHAPES[name].padded(world)
    idx, targets = _batch(shape)
    for sequence_parallel in (False, True):
        case = f"{name} tp={world} sp={sequence_parallel}"
        unfused = GPT(shape, TensorParallelLayers(group, CommStats(), sequence_parallel), seed=3)
        loss_ref, grads_ref = _loss_and_grads(unfused, idx, targets, group)
        stats = CommStats()
        fused = GPT(shape, TensorParallelLayers(group, stats, sequence_parallel), seed=3)
        fused.fused_loss = True
        loss, grads = _loss_and_grads(fused, idx, targets, group)
        torch.testing.assert_close(loss, loss_ref, **CLOSE, msg=case)
        for param_name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[param_name], **CLOSE, msg=f"{case} {param_name}")
        assert stats["all_reduce"].count > 0, case  # the row statistics were reduced over the shards


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", SHAPES)
def test_tensor_parallel_fused_loss_equals_the_unfused_one(name, world):
    run_ranks(_check_tensor_parallel, world, name)


@pytest.mark.parametrize("name", SHAPES)
def test_activations_drop_by_the_logits_the_formula_counts(name):
    """What autograd keeps for backward (``ActivationMeter``), fused against unfused: the formulas' difference, the
    (tokens, V) fp32 log-probabilities less the head weight's gradient the fused head keeps from forward on."""
    from trainer.analysis.formulas import head_activation_bytes
    from trainer.training.instruments import ActivationMeter

    shape = SHAPES[name].padded()
    idx, targets = _batch(shape)
    peaks = {}
    for fused in (False, True):
        model = GPT(shape, DenseLayers(), seed=3)
        model.fused_loss = fused
        meter = ActivationMeter(model)
        with meter.track():
            model(idx, targets).backward()
        peaks[fused] = meter.peak
    s, b, h, V = shape.seq_len, idx.shape[0], shape.n_embd, shape.vocab_size
    predicted = [head_activation_bytes(s, b, h, V, fused=fused) for fused in (False, True)]
    assert predicted[0] - predicted[1] == s * b * V * 4 - V * h * 4
    # The unfused loss also keeps its int64 targets and a scalar weight (nll_loss), which no formula counts.
    assert peaks[False] - peaks[True] - (predicted[0] - predicted[1]) == s * b * 8 + 4
