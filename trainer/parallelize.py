"""Apply the configured parallelism to the single-device GPT, in one place and a fixed order:

1. mesh       ParallelDims(world, tp, pp) -> process groups (a value, passed on)
2. build + TP the GPT asks its layer provider for layers: plain torch.nn at tp=1, the
              project's shard-sized Megatron layers at tp>1 (sequence-split under SP)
3. SP grads   replicated parameters that see 1/tp of the tokens get their gradients summed
              over the tp group during backward (composes with ZeRO's own hooks)
4. engine     deepspeed.initialize(..., mpu=mesh) in trainer.engine: ZeRO partitions over the
              dp group; the gradient norm counts each shard once
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.model import GPT, DenseLayers, GPTShape, analytic_param_count
from trainer.parallel import (
    CommStats,
    Mesh,
    TensorParallelLayers,
    padded_vocab_size,
    register_sequence_parallel_grad_hooks,
)


def model_shape(cfg: Config) -> GPTShape:
    """The GPT's shape; the embedding is padded so every tp rank holds an equal vocabulary slice."""
    m, p = cfg.model, cfg.parallel
    vocab = padded_vocab_size(m.vocab_size, p.tp, m.make_vocab_size_divisible_by)
    return GPTShape(m.n_layer, m.n_embd, m.n_head, m.seq_len, vocab, m.dropout)


@dataclass
class ParallelModel:
    model: GPT
    comm: CommStats  # the tensor-parallel collectives, counted by the layers themselves
    num_params: int  # full (gathered) size, padding included
    analytic_params: int  # Narayanan et al.'s count for the same shape


def build_parallel_model(cfg: Config, mesh: Mesh, device: torch.device) -> ParallelModel:
    shape = model_shape(cfg)
    comm = CommStats()
    tp = cfg.parallel.tp
    layers = DenseLayers() if tp == 1 else TensorParallelLayers(mesh.tp_group, comm, cfg.parallel.sequence_parallel)
    model = GPT(shape, layers, seed=cfg.train.seed).to(device)
    if cfg.parallel.sequence_parallel:
        register_sequence_parallel_grad_hooks(model, mesh.tp_group, comm)
    analytic = analytic_param_count(shape.n_layer, shape.n_embd, shape.vocab_size, shape.seq_len)
    return ParallelModel(model, comm, model.num_params(), analytic)
