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
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import store as checkpoint
from trainer.checkpoint.consolidate import read_meta
from trainer.checkpoint.resume import check_model_matches, layout_of, model_meta, restore
from trainer.config.schema import BadInput, BatchPlan, Config
from trainer.data.setup import build_streams, prepare_data
from trainer.runtime.env import world_size_from_env

# ZeRO calls a torch collective under its deprecated name; the warning repeats every step.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")


def write_run_files(run_dir: Path, cfg_node: DictConfig, ds_dict: dict) -> None:
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


def run(cfg: Config, cfg_node: DictConfig, plan: BatchPlan, run_dir: Path) -> None:
    from trainer.analysis.formulas import flops_per_token
    from trainer.parallel import ParallelDims, build_mesh
    from trainer.parallel.apply import build_parallel_model, engine_extras
    from trainer.runtime.ds_config import ds_config
    from trainer.runtime.engine import build_engine, init_distributed, resolve_device
    from trainer.runtime.hardware import peak_flops
    from trainer.training.guard import NaNInjection, install_nonfinite_skip
    from trainer.training.loop import Throughput, Trainer
    from trainer.training.metrics import Console, MetricsLog
    from trainer.training.schedule import scheduler_factory
    from trainer.training.tracking import start_run

    # Everything that can be refused is checked before the process group starts.
    prepared = prepare_data(cfg)
    dims = ParallelDims(world_size_from_env(), cfg.parallel.tp, cfg.parallel.pp)
    coords = dims.coords(int(os.environ.get("RANK", "0")))  # known before any process group exists
    stream, val = build_streams(cfg, plan, prepared, coords.dp, dims.dp)
    found = checkpoint.find(cfg.train.resume, run_dir)
    start_from = checkpoint.find(cfg.train.init_from, run_dir) if found is None else None
    for where in (found, start_from):
        if where is not None:
            check_model_matches(cfg, where.step_dir)
    if found is not None and "tp" not in read_meta(found.step_dir).get("layout", {}):
        raise BadInput(f"{found.step_dir} holds weights only (an import); start from it with train.init_from")
    if cfg.train.save_interval != -1:
        checkpoint.check_writable(run_dir)

    device = resolve_device(cfg.train.device)
    rank, world = init_distributed(device, cfg.train.collective_timeout_s)
    check_same_run_dir(run_dir)
    mesh = build_mesh(dims)
    is_writer = rank == 0
    # One line per rank, once: where it runs and its place in the mesh (multi-node debugging).
    print(
        f"rank {rank}/{world} on {socket.gethostname()} local_rank {os.environ.get('LOCAL_RANK', '0')}: "
        f"tp {coords.tp} pp {coords.pp} dp {coords.dp}",
        flush=True,
    )
    # Dropout masks differ between data-parallel replicas but agree across the tp ranks of one
    # replica, whose replicated activations must stay identical. Weights are seeded by name.
    torch.manual_seed(cfg.train.seed + 1000 * coords.pp + coords.dp)

    built = build_parallel_model(cfg, mesh, device)
    ds_dict, mpu = engine_extras(cfg, mesh, ds_config(cfg, plan))
    console = Console(is_writer, cfg.train.steps, cfg.logging.progress)
    console.print(describe(cfg, plan, built, dims, world, run_dir))
    if is_writer:
        write_run_files(run_dir, cfg_node, ds_dict)
    engine = build_engine(
        built.model, ds_dict, cfg.optim.weight_decay, scheduler_factory(cfg.optim, cfg.train.steps), mpu
    )
    install_nonfinite_skip(engine)
    if cfg.train.inject_nan_steps:
        NaNInjection(engine, cfg.train.inject_nan_steps).attach(built.model)
    saver = checkpoint.Saver(
        engine,
        mesh,
        built.dense_named_parameters,
        run_dir,
        {"model": model_meta(cfg), "layout": layout_of(cfg, dims)},
        prepared.tokenizer_dir,
        cfg.train.keep_last,
    )
    start_step = restore(engine, saver, found, start_from, stream, console)

    wandb_run = (
        start_run(cfg.logging.wandb, run_dir, OmegaConf.to_container(cfg_node, resolve=True), run_dir.name)
        if is_writer
        else None
    )
    metrics = MetricsLog(run_dir, is_writer, wandb_run)

    def save(step: int) -> None:
        path = saver.save(step, {"step": step, "stream": stream.state_dict(), "tokens": step * plan.tokens_per_step})
        console.print(f"checkpoint {path}")

    shape = built.shape
    throughput = Throughput(
        flops_per_token(shape.n_layer, shape.n_embd, shape.seq_len, shape.vocab_size),
        peak_flops(device, cfg.parallel.precision),
        world,
    )
    console.print(f"peak {throughput.peak_flops_per_rank / 1e9:,.0f} GFLOP/s per rank ({device.type})")
    trainer = Trainer(
        engine, stream, val, cfg.train, plan, device, mesh, throughput, built.comm, metrics, console, save
    )
    try:
        result = trainer.fit(start_step)
    finally:
        console.close()
        metrics.close()
    finish(result, run_dir, is_writer, console)


def describe(cfg: Config, plan: BatchPlan, built, dims, world: int, run_dir: Path) -> str:
    return (
        f"model {cfg.model.name}: {built.num_params:,} parameters "
        f"(analytic 12lh²(1+13/12h+(V+s)/12lh) = {built.analytic_params:,}, "
        f"+2h final LayerNorm) | world {world} = tp {dims.tp} x pp {dims.pp} x dp {dims.dp}, "
        f"zero {cfg.parallel.zero_stage}, sp {cfg.parallel.sequence_parallel}, "
        f"micro {plan.micro_batch} x accum {plan.grad_accum} = global {plan.global_batch} | run dir {run_dir}"
    )


def finish(result, run_dir: Path, is_writer: bool, console) -> None:
    summary = {
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "steps": result.steps,
        "run_dir": str(run_dir),
    }
    if is_writer:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"done: loss {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}, val_loss {_fmt(result.val_loss)}, "
        f"val_ppl {_fmt(result.val_ppl, 2)}\nresults in {run_dir} (metrics.jsonl, summary.json, config.yaml, "
        f"ds_config.json, checkpoints/)"
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
