"""One training run, assembled: validate-time checks that need the data or a checkpoint (before any
process group starts, so bad input still exits cleanly), then the process group, the model in its
layout, the DeepSpeed engine, the checkpoint saver, and the loop. Everything a run produces lands
in its run directory. The command line is ``trainer.train``'s.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import store as checkpoint
from trainer.checkpoint.consolidate import read_meta
from trainer.checkpoint.resume import check_model_matches, layout_of, model_meta, restore
from trainer.config.schema import BadInput, BatchPlan, Config, lean_heap
from trainer.data.setup import build_streams, prepare_data
from trainer.runtime.env import world_size_from_env
from trainer.runtime.hardware import slow_cpu_precision
from trainer.training.preempt import MARKER, Preempted, StopSignal
from trainer.training.profiler import StepProfiler
from trainer.training.record import Throughput, finish
from trainer.training.samples import Samples, skip_reason

# ZeRO calls a torch collective under its deprecated name; the warning repeats every step.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
RUN_FILES = "metrics.jsonl, summary.json, config.yaml, ds_config.json, checkpoints/"


def write_run_files(run_dir: Path, cfg_node: DictConfig, ds_dict: dict) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)  # left by a preempted run this one continues
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node, resolve=True))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_dict, indent=2) + "\n")


def check_same_run_dir(run_dir: Path) -> None:
    """All ranks must write into one directory; refuse to train if they disagree."""
    import torch.distributed as dist

    dirs = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, str(run_dir))
    if len(set(dirs)) > 1:
        raise RuntimeError(
            f"ranks disagree on the run directory ({sorted(set(dirs))}); "
            "set TRAINER_LAUNCH_ID to the same value on every node"
        )


@dataclass
class Inputs:
    """What a run reads before any process group starts (so refusing any of it exits cleanly)."""

    prepared: Any  # trainer.data.prepare.PreparedData
    dims: Any  # trainer.parallel.ParallelDims
    coords: Any  # this rank's place in the mesh
    stream: Any
    val: list
    found: Any  # the checkpoint to resume from, or None
    start_from: Any  # the weights to start from, or None
    samples: Any = None  # trainer.training.samples.Samples where this layout samples, else None


def check_inputs(cfg: Config, plan: BatchPlan, run_dir: Path) -> Inputs:
    """Data, streams and checkpoints, checked before the process group starts."""
    from trainer.parallel import ParallelDims

    prepared = prepare_data(cfg)
    dims = ParallelDims(world_size_from_env(), cfg.parallel.tp, cfg.parallel.pp)
    coords = dims.coords(int(os.environ.get("RANK", "0")))  # known before any process group exists
    stream, val = build_streams(cfg, plan, prepared, coords.dp, dims.dp)
    samples = None
    if cfg.train.sample_prompts and skip_reason(cfg) is None:  # prompts too long for the context are refused here
        samples = Samples(cfg.train.sample_prompts, cfg.train.sample_tokens, prepared.tokenizer_dir, cfg.model.seq_len)
    found = checkpoint.find(cfg.train.resume, run_dir)
    start_from = checkpoint.find(cfg.train.init_from, run_dir) if found is None else None
    check_checkpoints(cfg, found, start_from)
    if cfg.train.save_interval != -1:
        checkpoint.check_writable(run_dir)
    return Inputs(prepared, dims, coords, stream, val, found, start_from, samples)


def check_checkpoints(cfg: Config, found, start_from) -> None:
    """What the run resumes or starts from holds this model, and a resume has a layout to resume."""
    for where in (found, start_from):
        if where is not None:
            check_model_matches(cfg, where.step_dir)
    if found is not None and "tp" not in read_meta(found.step_dir).get("layout", {}):
        raise BadInput(f"{found.step_dir} holds weights only (an import); start from it with train.init_from")


def verify_checkpoints(cfg: Config, inputs: Inputs, rank: int, world: int) -> None:
    """The chosen checkpoints' checksums, each rank reading its share of the files (a collective); an
    older checkpoint where the chosen one fails, checked like the first."""
    found = checkpoint.settle(inputs.found, rank, world)
    start_from = checkpoint.settle(inputs.start_from, rank, world)
    if (found, start_from) != (inputs.found, inputs.start_from):
        check_checkpoints(cfg, found, start_from)
        inputs.found, inputs.start_from = found, start_from


def start_ranks(cfg: Config, inputs: Inputs, run_dir: Path):
    """The process group and the mesh; (device, rank, world, mesh)."""
    from trainer.parallel import build_mesh
    from trainer.runtime.engine import init_distributed, resolve_device
    from trainer.runtime.hardware import pin_mmap_threshold

    device = resolve_device(cfg.train.device)
    if lean_heap(cfg.train.host_heap, device.type == "cpu", cfg.parallel.zero_stage):
        pin_mmap_threshold()
    rank, world = init_distributed(device, cfg.train.collective_timeout_s)
    check_same_run_dir(run_dir)
    mesh = build_mesh(inputs.dims)
    c = inputs.coords
    # One line per rank, once: where it runs and its place in the mesh (multi-node debugging).
    print(
        f"rank {rank}/{world} on {socket.gethostname()} local_rank {os.environ.get('LOCAL_RANK', '0')}: "
        f"tp {c.tp} pp {c.pp} dp {c.dp}",
        flush=True,
    )
    # Dropout masks differ between data-parallel replicas but agree across the tp ranks of one
    # replica, whose replicated activations must stay identical. Weights are seeded by name.
    torch.manual_seed(cfg.train.seed + 1000 * c.pp + c.dp)
    return device, rank, world, mesh


def build_engine_for(cfg: Config, built, ds_dict: dict, mpu):
    """The DeepSpeed engine around the built model, with the trainer's guards installed."""
    from trainer.runtime.engine import build_engine
    from trainer.training.guard import NaNInjection, install_nonfinite_skip
    from trainer.training.schedule import scheduler_factory

    schedule = scheduler_factory(cfg.optim, cfg.train.steps)
    engine = build_engine(built.model, ds_dict, cfg.optim.weight_decay, schedule, mpu)
    install_nonfinite_skip(engine)
    if cfg.train.inject_nan_steps:
        NaNInjection(engine, cfg.train.inject_nan_steps).attach(built.model)
    return engine


def run(cfg: Config, cfg_node: DictConfig, plan: BatchPlan, run_dir: Path) -> None:
    from trainer.parallel.apply import build_parallel_model, engine_extras
    from trainer.parallel.dp_sync import build_dp_sync
    from trainer.runtime.ds_config import ds_config
    from trainer.runtime.engine import shutdown
    from trainer.training.loop import LoopParts, Trainer
    from trainer.training.output import Console

    inputs = check_inputs(cfg, plan, run_dir)  # everything that can be refused, before the process group
    device, rank, world, mesh = start_ranks(cfg, inputs, run_dir)
    verify_checkpoints(cfg, inputs, rank, world)  # checksums, each rank its share: needs the process group
    ds_dict, mpu = engine_extras(cfg, mesh, ds_config(cfg, plan, cuda=device.type == "cuda"))
    built = build_parallel_model(cfg, mesh, device, ds_dict)
    speed = apply_speed(cfg, built.model, device, ds_dict)
    console = Console(rank == 0, cfg.train.steps, cfg.logging.progress)
    console.print(describe(cfg, plan, built, inputs.dims, world, run_dir))
    console.print(speed)
    if cfg.train.sample_prompts and inputs.samples is None:
        console.print(skip_reason(cfg))
    if rank == 0:
        write_run_files(run_dir, cfg_node, ds_dict)
    engine = build_engine_for(cfg, built, ds_dict, mpu)
    saver = checkpoint.Saver(
        engine,
        mesh,
        built.dense_named_parameters,
        run_dir,
        {"model": model_meta(cfg), "layout": layout_of(inputs.dims, ds_dict)},
        inputs.prepared.tokenizer_dir,
        cfg.train.keep_last,
        cfg.train.deepspeed_files,
    )
    metrics = open_metrics(cfg, cfg_node, run_dir, rank == 0)
    if cfg.parallel.auto:  # the planner's choice, to read beside what the run measures
        log_auto_choice(cfg, world, metrics, console)
    start_step, loaded = restore(engine, saver, inputs.found, inputs.start_from, inputs.stream, console)
    if loaded is not None:
        log_checkpoint_io(start_step, "load", loaded, metrics, console)

    def save(step: int) -> None:
        state = {"step": step, "stream": inputs.stream.state_dict(), "tokens": step * plan.tokens_per_step}
        console.print(f"checkpoint {saver.save(step, state)}")
        log_checkpoint_io(step, "save", saver.io, metrics, console)

    throughput = throughput_of(cfg, built.shape, device, world)
    console.print(f"peak {throughput.peak_flops_per_rank / 1e9:,.0f} GFLOP/s per rank ({device.type})")
    if device.type == "cpu" and rank == 0 and (slow := slow_cpu_precision(cfg.parallel.precision)):
        console.print(slow)
    stop = StopSignal().install()
    parts = LoopParts(
        engine, inputs.stream, inputs.val, cfg.train, plan, mesh, device, throughput, built.comm, metrics, console, save
    )
    parts.stop = stop
    parts.samples = inputs.samples if rank == 0 else None
    parts.dp_sync = build_dp_sync(cfg.parallel, engine, mesh, cfg.train.steps)
    t = cfg.train
    parts.profiler = StepProfiler(t.profile_start, t.profile_steps, list(t.profile_ranks), rank, device, run_dir)
    try:
        result = Trainer(parts).fit(start_step)
        stop.restore()  # (after a stop the handlers stay: a late signal must not kill the exit's cleanup)
    except Preempted as preempted:
        console.print(str(preempted))
        if rank == 0:
            record = {"step": preempted.step, "signal": preempted.signal_name, "saved": preempted.saved}
            (run_dir / MARKER).write_text(json.dumps(record) + "\n")
        shutdown()
        raise
    finally:
        console.close()
        metrics.close()
    finish(result, run_dir, rank == 0, console, RUN_FILES)
    shutdown()


def apply_speed(cfg: Config, model, device, ds_dict: dict) -> str:
    """speed.flash_attention, speed.compile and speed.fused_loss on the built model (or this rank's pipeline
    stage); one line saying what every speed option resolved to."""
    from trainer.runtime.speed import compile_blocks, flash_required, fuse_loss, use_flash

    flash = flash_required(cfg.speed, cfg.parallel.precision, device.type == "cuda")
    if flash:
        use_flash(model)  # validation ran the kernel once at this shape
    compiled = compile_blocks(model) if cfg.speed.compile else 0
    if cfg.speed.fused_loss:
        fuse_loss(model)
    zero = ds_dict["zero_optimization"]
    on = lambda value: "on" if value else "off"  # noqa: E731
    overlap = f"overlap_comm {on(zero.get('overlap_comm'))}" if zero["stage"] else "no ZeRO"
    if zero["stage"] != cfg.parallel.zero_stage:  # speed.flat_optimizer (ds_config.engine_zero_stage)
        overlap = "flat optimizer (ZeRO-1 at dp 1)"
    return (
        f"speed: fused AdamW {on(ds_dict['optimizer']['params'].get('fused'))}, {overlap}, "
        f"flash attention {'required' if flash else 'as torch chooses'}, compiled blocks {compiled}, "
        f"fused loss {on(cfg.speed.fused_loss)}"
    )


def log_checkpoint_io(step: int, kind: str, mine: dict, metrics, console) -> None:
    """Every rank's time, memory and bytes of a checkpoint save or load, as one record (collective)."""
    from trainer.parallel.mappings import gather_objects
    from trainer.training.record import CheckpointRecord

    ranks = gather_objects(mine)
    fields = ("seconds", "rss_before_bytes", "peak_rss_bytes", "state_bytes")
    record = CheckpointRecord(step, kind, *([r.get(f, 0) for r in ranks] for f in fields))
    metrics.log(record.to_dict())
    console.print(record.line())


def log_auto_choice(cfg: Config, world: int, metrics, console) -> None:
    from trainer.analysis.planner.auto import describe
    from trainer.training.record import AutoRecord

    console.print(describe(cfg.parallel, world))
    metrics.log(AutoRecord.of(cfg.parallel).to_dict())


def open_metrics(cfg: Config, cfg_node: DictConfig, run_dir: Path, is_writer: bool):
    """metrics.jsonl (and the wandb run) on the writing rank; a disabled log elsewhere."""
    from trainer.training.output import MetricsLog
    from trainer.training.tracking import start_run

    config = OmegaConf.to_container(cfg_node, resolve=True)
    wandb_run = start_run(cfg.logging.wandb, run_dir, config, run_dir.name) if is_writer else None
    return MetricsLog(run_dir, is_writer, wandb_run)


def throughput_of(cfg: Config, shape, device, world: int) -> Throughput:
    """Model FLOPs per token (what MFU counts) and the device's peak, for a built shape."""
    from trainer.analysis.formulas import shape_flops_per_token
    from trainer.runtime.hardware import peak_flops

    fpt = shape_flops_per_token(shape)
    return Throughput(fpt, peak_flops(device, cfg.parallel.precision), world)


def describe(cfg: Config, plan: BatchPlan, built, dims, world: int, run_dir: Path) -> str:
    return (
        f"model {cfg.model.name}: {built.num_params:,} parameters "
        f"(analytic {built.analytic_params:,}) | world {world} = tp {dims.tp} x pp {dims.pp} x dp {dims.dp}, "
        f"zero {cfg.parallel.zero_stage}, sp {cfg.parallel.sequence_parallel}, "
        f"micro {plan.micro_batch} x accum {plan.grad_accum} = global {plan.global_batch} | run dir {run_dir}"
    )
