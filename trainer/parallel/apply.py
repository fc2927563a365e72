"""Apply the configured parallelism to the single-device GPT, in one place and a fixed order:

1. mesh       ParallelDims(world, tp, pp) -> process groups (a value, passed on)
2. build + TP the GPT asks its layer provider for layers: plain torch.nn at tp=1, the
              project's shard-sized Megatron layers at tp>1 (sequence-split under SP)
3. SP grads   replicated parameters that see 1/tp of the tokens get their gradients summed
              over the tp group during backward (composes with ZeRO's own hooks)
4. engine     deepspeed.initialize(..., mpu=mesh) in trainer.runtime.engine: ZeRO partitions over the
              dp group; the gradient norm counts each shard once. ZeRO-3 partitions earlier, while
              the GPT is built (deepspeed.zero.Init), so no rank ever holds the whole model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config.schema import Config
from trainer.config.validate import recompute_plan
from trainer.model import GPT, DenseLayers, ModelShape
from trainer.parallel import (
    CommStats,
    Mesh,
    TensorParallelLayers,
    register_sequence_parallel_grad_hooks,
)
from trainer.parallel.pipeline import build_pipeline_module, dense_named_parameters, pipeline_config


def model_shape(cfg: Config) -> ModelShape:
    """The GPT's shape; the embedding is padded so every tp rank holds an equal vocabulary slice."""
    return ModelShape.from_config(cfg.model).padded(cfg.parallel.tp)


@dataclass
class ParallelModel:
    model: nn.Module  # the GPT, or at pp>1 this rank's stage of it (a PipelineModule)
    shape: ModelShape
    comm: CommStats  # the tensor-parallel collectives, counted by the layers themselves
    num_params: int  # full (gathered) size, padding included
    analytic_params: int  # the formula's count for the same shape (Narayanan et al.'s + 2h for GPT)

    def dense_named_parameters(self):
        """(name in the dense GPT, parameter or its shard) for every parameter this rank holds."""
        if isinstance(self.model, GPT):
            return self.model.named_parameters()
        return dense_named_parameters(self.model, self.shape.n_layer)


def build_parallel_model(cfg: Config, mesh: Mesh, device: torch.device, ds_dict: dict) -> ParallelModel:
    p = cfg.parallel
    shape = model_shape(cfg)
    comm = CommStats()
    layers = DenseLayers() if p.tp == 1 else TensorParallelLayers(mesh.tp_group, comm, p.sequence_parallel)
    recompute, every = recompute_plan(cfg.parallel)
    if p.pp == 1 and p.zero_stage == 3:
        model = _build_partitioned(cfg, shape, layers, mesh, ds_dict, recompute, every)
        num_params = model.num_params()
    elif p.pp == 1:
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
    return ParallelModel(model, shape, comm, num_params, shape.params())


def _build_partitioned(cfg: Config, shape: ModelShape, layers, mesh: Mesh, ds_dict: dict, recompute, every) -> GPT:
    """ZeRO-3: each layer's parameters are partitioned over dp as it is built, then drawn one at a time
    under their names (the same weights as at every other layout)."""
    from trainer.model.gpt import init_weights
    from trainer.runtime.engine import zero3_construction
    from trainer.runtime.hardware import release_free_memory

    context, whole = zero3_construction(ds_dict, mesh)
    with context:
        model = GPT(shape, layers, None, recompute, every)
    init_weights(model, cfg.train.seed, shape.n_layer, whole=whole)
    release_free_memory()  # the per-parameter gathers' temporaries
    return model


def engine_extras(cfg: Config, mesh: Mesh, ds_dict: dict) -> tuple[dict, Mesh | None]:
    """The DeepSpeed dict and ``mpu`` for this layout: pipelines bring their own grid (mpu=None)."""
    if cfg.parallel.pp == 1:
        return ds_dict, mesh
    return {**ds_dict, "pipeline": pipeline_config(mesh.dims, cfg.parallel.sequence_parallel)}, None
