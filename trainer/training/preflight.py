"""Memory preflight: the planner's prediction for the launched layout against what each rank has, before
any process group starts, so a run that cannot fit ends with one line instead of an out-of-memory kill
minutes (or hours, on a queue) later.

The prediction is a lower bound: the planner's model states, activations and ZeRO buffers
(``trainer.analysis.planner.memory``) without allocator slack or the runtime's own memory, and without
the s×s attention scores (fused attention kernels -- flash on GPUs, torch's CPU kernel -- keep none:
``trainer.analysis.planner.stages.keeps_attention_scores``). What a rank has: the free memory of its GPU, or on
CPU the machine's available memory shared by the ranks started on it. Only a run that cannot fit is
refused; the line names the cheapest change that would fit. ``train.memory_check=false`` skips the check.
"""

from __future__ import annotations

from dataclasses import replace

from trainer.config.schema import BadInput, Config
from trainer.config.validate import recompute_plan

GB = 1e9


def check_memory(cfg: Config, world: int, device) -> None:
    """Raise BadInput when this rank cannot hold its share of the launched layout (see the module)."""
    if not cfg.train.memory_check:
        return
    layout = launched_layout(cfg, world, device.type == "cuda")
    needed = predicted_bytes(cfg, layout)
    available, where = available_bytes(device)
    if needed <= available:
        return
    fix = cheapest_fix(cfg, layout, available)
    raise BadInput(
        f"memory check: this layout needs at least {needed / GB:.1f} GB per rank (the planner's model states, "
        f"activations and buffers), {available / GB:.1f} GB available per rank ({where}); {fix}; "
        "or set train.memory_check=false to start anyway"
    )


def launched_layout(cfg: Config, world: int, cuda: bool = False):
    """The planner's Layout of the launched run, at the ZeRO stage DeepSpeed will run (``speed.flat_optimizer``
    runs ZeRO-1, with its flat step buffers, for ZeRO-0 at dp 1)."""
    from trainer.analysis.planner.layouts import Layout
    from trainer.runtime.ds_config import engine_zero_stage

    p = cfg.parallel
    mode, _ = recompute_plan(p)
    dp = world // (p.tp * p.pp)
    zero = engine_zero_stage(cfg, dp, cuda)
    return Layout(p.tp, p.pp, dp, zero, p.micro_batch, mode, p.sequence_parallel, fused_loss=cfg.speed.fused_loss)


def predicted_bytes(cfg: Config, layout) -> float:
    from trainer.analysis.planner.memory import memory_per_gpu
    from trainer.analysis.planner.stages import keeps_attention_scores
    from trainer.model.shape import ModelShape

    shape = ModelShape.from_config(cfg.model)
    p = cfg.parallel
    # The trainer runs DeepSpeed's pipeline engine: its stages are cut by parallel.pipeline_partition, and its
    # fused attention keeps no s×s scores.
    scores = keeps_attention_scores("deepspeed")
    memory = memory_per_gpu(
        shape,
        layout,
        p.global_batch,
        p.precision,
        0.0,
        0.0,
        partition=p.pipeline_partition,
        scores=scores,
        engine="deepspeed",
    )
    return memory.total


def available_bytes(device) -> tuple[float, str]:
    """(bytes this rank may use, how that was found)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    from trainer.runtime.env import local_world_size

    ranks = local_world_size()
    available = psutil.virtual_memory().available
    return available / ranks, f"{available / GB:.1f} GB available on this machine / {ranks} local ranks"


def cheapest_fix(cfg: Config, layout, available: float) -> str:
    """The first change that fits, cheapest first: a smaller micro-batch, full recompute, a higher ZeRO
    stage, all three; else more ranks."""
    for change, candidate in _candidates(layout, cfg.parallel.global_batch):
        if predicted_bytes(cfg, candidate) <= available:
            return f"{change} needs at least {predicted_bytes(cfg, candidate) / GB:.1f} GB"
    return "no micro-batch, recompute or ZeRO stage fits: use more ranks (tensor or pipeline) or a smaller model"


def _candidates(layout, global_batch: int):
    per_replica = global_batch // layout.dp
    micros = [m for m in range(layout.micro_batch - 1, 0, -1) if per_replica % m == 0]
    for micro in micros:
        yield f"parallel.micro_batch={micro}", replace(layout, micro_batch=micro)
    if layout.recompute != "full":
        yield "parallel.recompute=full", replace(layout, recompute="full")
    top = 3 if layout.pp == 1 else 1  # DeepSpeed's pipeline engine takes ZeRO 0 and 1
    for zero in range(layout.zero_stage + 1, top + 1):
        yield f"parallel.zero_stage={zero}", replace(layout, zero_stage=zero)
    smallest = replace(layout, micro_batch=min(micros, default=layout.micro_batch), recompute="full", zero_stage=top)
    words = f"parallel.micro_batch={smallest.micro_batch} parallel.recompute=full parallel.zero_stage={top}"
    yield words, smallest
