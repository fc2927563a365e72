"""Entry point: ``python -m trainer.train [overrides]`` or, for N ranks,
``deepspeed --num_gpus N --no_local_rank --module trainer.train [overrides]``.

Order: validate the config and prepare the data (no process group yet, so bad input exits
cleanly with code 2) -> start the process group -> build the model -> wrap it in the DeepSpeed
engine -> fit. Everything a run produces lands in its Hydra run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer import checkpoint
from trainer.cli import EXIT_BAD_INPUT, preflight, print_bad_input, register
from trainer.config import BadInput, BatchPlan, Config, ConfigError, adopt_mpi_env, validate, world_size_from_env
from trainer.consolidate import read_meta
from trainer.guard import TooManySkips

register()
# ZeRO calls a torch collective under its deprecated name; the warning repeats every step.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")


@contextmanager
def _exclusive(lock_path: Path):
    """Ranks of one machine prepare the corpus one after another; later ones find the cache."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(cfg: Config):
    from trainer.data.prepare import prepare

    with _exclusive(Path(cfg.data.cache_dir) / ".prepare.lock"):
        try:
            prepared = prepare(cfg.data)
        except ValueError as err:  # the data pipeline reports unusable corpora this way
            raise BadInput(f"data error: {err}") from None
    if prepared.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"the tokenizer has {prepared.vocab_size} tokens; "
            "raise model.vocab_size or lower data.tokenizer.vocab_size",
        )
    return prepared


def build_streams(cfg: Config, plan: BatchPlan, prepared, dp_rank: int, dp_size: int):
    """This rank's training stream and validation batches; a corpus too small for them is bad input."""
    from trainer.data.stream import SampleStream, TokenFile, eval_batches

    try:
        stream = SampleStream(
            TokenFile(prepared.train_path, prepared.dtype),
            cfg.model.seq_len,
            plan.micro_batch,
            plan.grad_accum,
            dp_rank,
            dp_size,
            cfg.train.seed,
        )
        val = list(
            eval_batches(
                TokenFile(prepared.val_path, prepared.dtype),
                cfg.model.seq_len,
                plan.global_batch,
                plan.micro_batch,
                dp_rank,
                dp_size,
                cfg.train.eval_batches,
            )
        )
    except ValueError as err:
        raise BadInput(str(err)) from None
    return stream, val


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
    from trainer.analytic import flops_per_token
    from trainer.ds_config import ds_config
    from trainer.engine import build_engine, init_distributed, resolve_device
    from trainer.guard import NaNInjection, install_nonfinite_skip
    from trainer.hardware import peak_flops
    from trainer.loop import Throughput, Trainer
    from trainer.metrics import Console, MetricsLog
    from trainer.parallel import ParallelDims, build_mesh
    from trainer.parallelize import build_parallel_model, engine_extras
    from trainer.schedule import scheduler_factory
    from trainer.tracking import start_run

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


def model_meta(cfg: Config) -> dict:
    m = cfg.model
    return {
        "n_layer": m.n_layer,
        "n_embd": m.n_embd,
        "n_head": m.n_head,
        "seq_len": m.seq_len,
        "vocab_size": m.vocab_size,
    }


def layout_of(cfg: Config, dims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": cfg.parallel.zero_stage}


def check_model_matches(cfg: Config, step_dir: Path) -> None:
    """A checkpoint of another model shape is bad input, found before any process group starts."""
    try:
        saved = read_meta(step_dir)["model"]
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"checkpoint {step_dir}: unreadable meta.json ({err})") from None
    ours = model_meta(cfg)
    for key in ("n_layer", "n_embd", "n_head", "seq_len"):
        if saved.get(key) != ours[key]:
            raise ConfigError(
                f"model.{key}",
                ours[key],
                f"the checkpoint {step_dir} has {key}={saved.get(key)}; use the same model shape to load it",
            )


def restore(engine, saver, found, start_from, stream, console) -> int:
    """Resume (same layout: exact; other layout: resharded) or start from given weights; the start step."""
    if found is None:
        if start_from is not None:
            checkpoint.init_weights_from(engine, start_from.step_dir, saver.mesh, saver.named_params)
            console.print(f"initialised weights from {start_from.step_dir}")
        return 0
    for why in found.skipped:
        console.print(f"warning: skipping damaged checkpoint {why}")
    resumed = checkpoint.load(engine, found, saver.mesh, saver.named_params, saver.meta["layout"])
    if resumed.stream is not None:
        stream.load_state_dict(resumed.stream)
    console.print(f"resumed from {found.step_dir} at step {resumed.step} ({resumed.how})")
    return resumed.step


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg_node: DictConfig) -> None:
    try:
        cfg: Config = OmegaConf.to_object(cfg_node)
        plan = validate(cfg, world_size_from_env())
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run(cfg, cfg_node, plan, run_dir)
    except BadInput as err:
        print_bad_input(err)
        _discard_unused_run_dir(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(EXIT_BAD_INPUT)
    except checkpoint.SaveError as err:  # the launcher then stops the other ranks
        print(f"checkpoint error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except TooManySkips as err:  # every rank sees the same count and stops at the same step
        print(f"stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _discard_unused_run_dir(run_dir: Path) -> None:
    """A run refused at start leaves no directory behind (Hydra made it before we could check)."""
    leftovers = {".hydra", "train.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    adopt_mpi_env()  # before anything reads RANK or WORLD_SIZE
    preflight(sys.argv[1:])
    main()
