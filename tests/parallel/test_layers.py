"""Each tensor-parallel layer against a dense torch.nn reference built from the gathered weights.

Every rank draws the same full weights, inputs and upstream gradients from one seed, runs the
dense reference on them, loads its shard into the parallel layer through ``shard_param`` and checks
output, input gradient and parameter gradients against the matching slices of the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import CLOSE
from trainer.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
)
from trainer.parallel.mappings import CommStats

from .spawn import run_ranks

pytestmark = pytest.mark.multiproc

B, T, IN, OUT, VOCAB = 2, 8, 16, 24, 32


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _load(layer: nn.Module, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in full.items():
            assert layer.full_param_shape(name) == tensor.shape
            getattr(layer, name).copy_(layer.shard_param(name, tensor))


def _dense_linear(weight, bias, x, grad_out):
    """Output, input grad, weight grad and bias grad of the dense layer for sum(Y * G)."""
    dense = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    x = x.clone().requires_grad_()
    y = dense(x)
    y.backward(grad_out)
    return y.detach(), x.grad, dense.weight.grad, dense.bias.grad


def _slicers(rank, world, sequence_parallel):
    """This rank's chunk of the features (last dim), and of the sequence (dim 1) under SP."""

    def features(t):
        return t.chunk(world, -1)[rank]

    def sequence(t):
        return t.chunk(world, 1)[rank] if sequence_parallel else t

    return features, sequence


def _check_column(rank, world, group, sequence_parallel, gather_output):
    W, b, X, G = (
        _randn(OUT, IN, seed=1),
        _randn(OUT, seed=2),
        _randn(B, T, IN, seed=3),
        _randn(B, T, OUT, seed=4),
    )
    y_ref, dx_ref, dw_ref, db_ref = _dense_linear(W, b, X, G)
    out_slice, seq_slice = _slicers(rank, world, sequence_parallel)

    layer = ColumnParallelLinear(IN, OUT, group, CommStats(), gather_output, sequence_parallel)
    _load(layer, {"weight": W, "bias": b})
    assert layer.weight.shape == (OUT // world, IN) and layer.weight.tensor_model_parallel
    x = seq_slice(X).clone().requires_grad_()  # (B, T/tp, IN) under SP, else (B, T, IN)
    y = layer(x)
    if gather_output:
        torch.testing.assert_close(y, y_ref, **CLOSE)
        y.backward(G)
    else:
        torch.testing.assert_close(y, out_slice(y_ref), **CLOSE)
        y.backward(out_slice(G))
    torch.testing.assert_close(x.grad, seq_slice(dx_ref), **CLOSE)
    torch.testing.assert_close(layer.weight.grad, dw_ref.chunk(world, 0)[rank], **CLOSE)
    torch.testing.assert_close(layer.bias.grad, db_ref.chunk(world, 0)[rank], **CLOSE)


def _check_row(rank, world, group, sequence_parallel):
    W, b, X, G = (
        _randn(OUT, IN, seed=5),
        _randn(OUT, seed=6),
        _randn(B, T, IN, seed=7),
        _randn(B, T, OUT, seed=8),
    )
    y_ref, dx_ref, dw_ref, db_ref = _dense_linear(W, b, X, G)
    in_slice, seq_slice = _slicers(rank, world, sequence_parallel)

    stats = CommStats()
    layer = RowParallelLinear(IN, OUT, group, stats, sequence_parallel)
    _load(layer, {"weight": W, "bias": b})
    assert layer.weight.shape == (OUT, IN // world) and layer.bias.shape == (OUT,)
    x = in_slice(X).clone().requires_grad_()  # (B, T, IN/tp)
    y = layer(x)  # (B, T/tp, OUT) under SP, else (B, T, OUT)
    torch.testing.assert_close(y, seq_slice(y_ref), **CLOSE)
    y.backward(seq_slice(G))
    torch.testing.assert_close(x.grad, in_slice(dx_ref), **CLOSE)
    torch.testing.assert_close(layer.weight.grad, dw_ref.chunk(world, 1)[rank], **CLOSE)
    if sequence_parallel:
        # The replicated bias saw only this rank's tokens: a partial sum until reduced.
        assert not torch.allclose(layer.bias.grad, db_ref, **CLOSE)
        allreduce_sequence_parallel_grads(layer, group, stats)
    torch.testing.assert_close(layer.bias.grad, db_ref, **CLOSE)


def _check_embedding(rank, world, group):
    W, G = _randn(VOCAB, IN, seed=9), _randn(B, T, IN, seed=10)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(11))
    ids[0, :world] = torch.arange(world) * (VOCAB // world)  # every shard owns some token
    dense = nn.Embedding(VOCAB, IN)
    with torch.no_grad():
        dense.weight.copy_(W)
    y_ref = dense(ids)
    y_ref.backward(G)

    layer = VocabParallelEmbedding(VOCAB, IN, group, CommStats())
    _load(layer, {"weight": W})
    y = layer(ids)
    torch.testing.assert_close(y, y_ref.detach(), **CLOSE)
    y.backward(G)
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad.chunk(world, 0)[rank], **CLOSE)


def _check_layers(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for sequence_parallel in (False, True):
        for gather_output in (False, True):
            _check_column(rank, world, group, sequence_parallel, gather_output)
        _check_row(rank, world, group, sequence_parallel)
    _check_embedding(rank, world, group)
    _check_indivisible_shapes_rejected(world, group)


def _check_indivisible_shapes_rejected(world, group):
    with pytest.raises(ValueError, match=f"out_features={world + 1} must be divisible by the tensor-parallel"):
        ColumnParallelLinear(IN, world + 1, group, CommStats())
    with pytest.raises(ValueError, match=f"in_features={world + 1} must be divisible"):
        RowParallelLinear(world + 1, OUT, group, CommStats())
    with pytest.raises(ValueError, match="num_embeddings"):
        VocabParallelEmbedding(world + 1, IN, group, CommStats())


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_match_dense(tp):
    run_ranks(_check_layers, tp)
