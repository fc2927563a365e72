"""Apply the configured parallelism to the single-device GPT, in one place and a fixed order:

1. mesh       ParallelDims(world, tp, pp) -> process groups (a value, passed on)
2. build + TP the GPT asks its layer provider for layers: plain torch.nn at tp=1, the
              project's shard-sized Megatron layers at tp>1 (sequence-split under SP)
3. SP grads   replicated parameters that see 1/tp of the tokens get their gradients summed
              over the tp group during backward (composes with ZeRO's own hooks)
4. engine     deepspeed.initialize(..., mpu=mesh) in trainer.runtime.engine: ZeRO partitions over the
              dp group; the gradient norm counts each shard once
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config.schema import Config
from trainer.model import GPT, DenseLayers, GPTShape, analytic_param_count
from trainer.parallel import (
    CommStats,
    Mesh,
    TensorParallelLayers,
    padded_vocab_size,
    register_sequence_parallel_grad_hooks,
)
from trainer.parallel.pipeline import build_pipeline_module, dense_named_parameters, pipeline_config


def model_shape(cfg: Config) -> GPTShape:
    """The GPT's shape; the embedding is padded so every tp rank holds an equal vocabulary slice."""
    m, p = cfg.model, cfg.parallel
    vocab = padded_vocab_size(m.vocab_size, p.tp, m.make_vocab_size_divisible_by)
    return GPTShape(m.n_layer, m.n_embd, m.n_head, m.seq_len, vocab, m.dropout)


@dataclass
class ParallelModel:
    model: nn.Module  # the GPT, or at pp>1 this rank's stage of it (a PipelineModule)
    shape: GPTShape
    comm: CommStats  # the tensor-parallel collectives, counted by the layers themselves
    num_params: int  # full (gathered) size, padding included
    analytic_params: int  # Narayanan et al.'s count for the same shape

    def dense_named_parameters(self):
        """(name in the dense GPT, parameter or its shard) for every parameter this rank holds."""
        if isinstance(self.model, GPT):
            return self.model.named_parameters()
        return dense_named_parameters(self.model, self.shape.n_layer)


def recompute_plan(cfg: Config) -> tuple[str, int]:
    """(none | selective | full, blocks per recomputed run). An interval > 0 alone has always meant
    full recompute (at pp>1, DeepSpeed's); 0 under recompute=full means every block on its own."""
    p = cfg.parallel
    mode = "full" if p.recompute == "none" and p.activation_checkpoint_interval > 0 else p.recompute
    return mode, max(p.activation_checkpoint_interval, 1)


def build_parallel_model(cfg: Config, mesh: Mesh, device: torch.device) -> ParallelModel:
    p = cfg.parallel
    shape = model_shape(cfg)
    comm = CommStats()
    layers = DenseLayers() if p.tp == 1 else TensorParallelLayers(mesh.tp_group, comm, p.sequence_parallel)
    recompute, every = recompute_plan(cfg)
    if p.pp == 1:
        model = GPT(shape, layers, cfg.train.seed, recompute, every).to(device)
        num_params = model.num_params()
    else:
        interval = every if recompute == "full" else 0  # DeepSpeed checkpoints runs of `interval` Blocks
        model = build_pipeline_module(
            shape, layers, mesh.dims, cfg.train.seed, p.pipeline_partition, interval, recompute == "selective"
        )
        with torch.device("meta"):  # the full model's size, without building it
            num_params = GPT(shape).num_params()
    if p.sequence_parallel:
        register_sequence_parallel_grad_hooks(model, mesh.tp_group, comm)
    analytic = analytic_param_count(shape.n_layer, shape.n_embd, shape.vocab_size, shape.seq_len)
    return ParallelModel(model, shape, comm, num_params, analytic)


def engine_extras(cfg: Config, mesh: Mesh, ds_dict: dict) -> tuple[dict, Mesh | None]:
    """The DeepSpeed dict and ``mpu`` for this layout: pipelines bring their own grid (mpu=None)."""
    if cfg.parallel.pp == 1:
        return ds_dict, mesh
    return {**ds_dict, "pipeline": pipeline_config(mesh.dims, cfg.parallel.sequence_parallel)}, None
