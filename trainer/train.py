"""Entry point: ``python -m trainer.train [overrides]`` or, for N ranks,
``deepspeed --num_gpus N --no_local_rank --module trainer.train [overrides]``.

Parses and validates the command line (bad input: one line, exit code 2, nothing written), then hands
the run to ``trainer.training.run``. Exit codes: 0 done, 1 a failed save or too many non-finite steps,
2 bad input, 75 stopped by SIGTERM or SIGUSR1 after saving a checkpoint (``trainer.training.preempt``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint.store import SaveError
from trainer.config.cli import EXIT_BAD_INPUT, preflight, print_bad_input
from trainer.config.schema import BadInput, Config
from trainer.config.validate import validate
from trainer.runtime.env import adopt_mpi_env, world_size_from_env
from trainer.runtime.process_exit import run_then_exit
from trainer.training.guard import TooManySkips
from trainer.training.preempt import EXIT_PREEMPTED, Preempted


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg_node: DictConfig) -> None:
    from trainer.training.run import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = resolved(cfg_node, world_size_from_env())
        plan = validate(cfg, world_size_from_env())
        run(cfg, cfg_node, plan, run_dir)
    except BadInput as err:
        print_bad_input(err)
        _discard_unused_run_dir(run_dir)
        sys.exit(EXIT_BAD_INPUT)
    except SaveError as err:  # the launcher then stops the other ranks
        print(f"checkpoint error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except TooManySkips as err:  # every rank sees the same count and stops at the same step
        print(f"stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted:  # every rank saved the same step; the line was printed
        sys.exit(EXIT_PREEMPTED)


def resolved(cfg_node: DictConfig, world: int) -> Config:
    """The typed config with ``parallel=auto`` turned into the layout it chose; the node (what config.yaml and
    wandb record) gets the same degrees and the choice."""
    from trainer.analysis.planner.auto import resolve_parallel

    cfg = resolve_parallel(OmegaConf.to_object(cfg_node), world)
    if cfg.parallel.auto:
        cfg_node.parallel = OmegaConf.structured(cfg.parallel)
    return cfg


def _discard_unused_run_dir(run_dir: Path) -> None:
    """A run refused at start leaves no directory behind (Hydra made it before we could check)."""
    leftovers = {".hydra", "train.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    adopt_mpi_env()  # before anything reads RANK or WORLD_SIZE
    preflight(sys.argv[1:])  # also registers the schema with Hydra
    run_then_exit(main)
