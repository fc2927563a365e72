"""Process-group start-up and the DeepSpeed engine around a built model."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
from torch import nn

# skip_shm_comm_op is also imported from here (tests start DeepSpeed without init_distributed)
from trainer.runtime.compat import (
    allow_cpu_fp16,
    bound_gloo_collectives,
    defer_muon_compilation,
    foreach_fp16_step,
    scale_zero0_fp16_loss,
    set_default_pg_timeout,
    share_zero3_fp32_partitions,
    skip_shm_comm_op,
    skip_single_replica_reduction,
    undo_fp16_optimizer_warmup,
)
from trainer.runtime.ds_config import ZERO_BUCKET_ELEMENTS
from trainer.runtime.env import free_port


def resolve_device(requested: str) -> torch.device:
    """auto -> cuda:<local rank> when a GPU is present, else cpu."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    _share_cores()
    return torch.device("cpu")


def _share_cores() -> None:
    """CPU ranks on one machine split its cores; oversubscribed threads slow every rank down."""
    if "OMP_NUM_THREADS" in os.environ:  # the user decided
        return
    from trainer.runtime.env import local_world_size

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def init_distributed(device: torch.device, timeout_s: int) -> tuple[int, int]:
    """Start the default process group (nccl on GPU, gloo on CPU); return (rank, world size).

    ``python -m trainer.train`` without a launcher is a world of one: the rendezvous variables a
    launcher would set are filled in so the same code path runs.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # Ops DeepSpeed JIT-builds (fused optimizers on GPU) go to one cache per environment instead of
    # a shared one that every other environment invalidates.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if device.type == "cpu":  # the op is the CPU accelerator's: CUDA's builders have no such op
        skip_shm_comm_op()  # process-wide for the run (trainer.runtime.compat)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # The timeout given here covers the default group only; later groups take torch's module default.
    set_default_pg_timeout(timeout)  # process-wide for the run (trainer.runtime.compat)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    if backend == "gloo":  # ZeRO's collectives of a tensor larger than a bucket, in bucket-sized pieces
        bound_gloo_collectives(ZERO_BUCKET_ELEMENTS)  # process-wide for the run (trainer.runtime.compat)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shutdown() -> None:
    """Tear the process groups down before the interpreter exits: left to exit-time destructors, gloo's
    worker threads can outlive their group and abort the process (std::terminate) after a good run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); leave biases and norm parameters alone. A ZeRO-3
    parameter is an empty 1-d tensor once partitioned: its own shape is ``ds_shape``."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = {id(p) for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2}
    return [
        {"params": [p for p in params if id(p) in matrix], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrix], "weight_decay": 0.0},
    ]


def build_engine(model: nn.Module, ds_dict: dict[str, Any], weight_decay: float, lr_scheduler, mpu=None):
    """``deepspeed.initialize`` with the generated config; returns the engine."""
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from trainer.parallel.pipeline import install_pipeline_clipping
    from trainer.runtime.hardware import release_free_memory

    if ds_dict["fp16"]["enabled"]:
        allow_cpu_fp16()  # DeepSpeed refuses fp16 on CPUs without fast fp16 kernels; torch's run it (compat)
        scale_zero0_fp16_loss()  # without ZeRO DeepSpeed 0.19.8 unscales gradients it never scaled (compat)
    defer_muon_compilation()  # ZeRO imports DeepSpeed's Muon module; without loading inductor (compat)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay),
        config=ds_dict,
        lr_scheduler=lr_scheduler,
        mpu=mpu,
        dist_init_required=False,
    )
    undo_fp16_optimizer_warmup(engine.optimizer)  # bf16/fp16 at ZeRO-0: Adam starts at step 0 (compat)
    foreach_fp16_step(engine.optimizer)  # ... and steps in multi-tensor kernels, its norm counting each shard once
    skip_single_replica_reduction(engine)  # one replica: no all-reduce of the gradients with itself (compat)
    if ds_dict["zero_optimization"]["stage"] == 3:
        share_zero3_fp32_partitions(engine.optimizer)  # fp32: no second copy of the weights (compat)
    release_free_memory()  # what the optimizer's set-up copied and freed
    if isinstance(engine, PipelineEngine):
        # DeepSpeed's clipping at ZeRO-0 ignores replicated parameters of later stages.
        install_pipeline_clipping(engine)
    return engine


def zero3_construction(ds_dict: dict[str, Any], mesh):
    """(context, whole): build a module inside ``context`` and ZeRO-3 partitions each parameter over the
    data-parallel group as its layer is created, so no rank ever holds the whole model; ``whole(param)``
    gathers one parameter, writable, and re-partitions it on exit (rank 0's values, broadcast).
    ``mesh`` is DeepSpeed's ``mpu`` here as for the engine: without it DeepSpeed checks the batch against the
    whole world, not the data-parallel degree, and refuses every tp > 1.
    """
    import deepspeed

    def whole(param):
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)

    context = deepspeed.zero.Init(
        data_parallel_group=mesh.dp_group,
        mpu=mesh,
        # The parameters' dtype comes from the config (fp32, bf16 or fp16). Not ``dtype=``: DeepSpeed 0.19
        # ignores it on an accelerator without fp16 (the CPU) and builds in bf16.
        config_dict_or_path=ds_dict,
        mem_efficient_linear=False,  # keep torch's own linear: the same kernels at every ZeRO stage
    )
    return context, whole
