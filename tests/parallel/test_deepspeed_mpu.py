"""The Mesh as DeepSpeed's ``mpu``: ZeRO-2 over a tp=2, sequence-parallel GPT reports the dense
model's loss and global gradient norm.

That needs the tp group from ``mpu`` (replicated parameters counted once via the
``tensor_model_parallel`` attribute, shards summed over the model-parallel group) and the
sequence-parallel gradient hooks to run before ZeRO-2 consumes gradients during backward.
"""

from __future__ import annotations

import pytest
import torch

from trainer.model import GPT, DenseLayers, ModelShape
from trainer.parallel import (
    CommStats,
    ParallelDims,
    TensorParallelLayers,
    build_mesh,
    register_sequence_parallel_grad_hooks,
)

from .spawn import run_ranks, start_deepspeed

SHAPE = ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=16, vocab_size=128)
SEED = 3


def _check_zero2(rank: int, world: int) -> None:
    deepspeed = start_deepspeed(rank, world)
    mesh = build_mesh(ParallelDims(world, tp=2))
    tokens = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_len + 1), generator=torch.Generator().manual_seed(0))
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    dense = GPT(SHAPE, DenseLayers(), SEED)
    loss_ref = dense(idx, targets)
    loss_ref.backward()
    norm_ref = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dense.parameters()]))

    stats = CommStats()
    model = GPT(SHAPE, TensorParallelLayers(mesh.tp_group, stats, sequence_parallel=True), SEED)
    register_sequence_parallel_grad_hooks(model, mesh.tp_group, stats)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mesh)
    loss = engine(idx, targets)
    engine.backward(loss)
    engine.step()
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(engine.get_global_grad_norm()), norm_ref, atol=1e-5, rtol=0)


@pytest.mark.multiproc
def test_zero2_grad_norm_matches_dense():
    run_ranks(_check_zero2, 2)
