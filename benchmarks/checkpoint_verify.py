"""Verifying a checkpoint against its manifest on N ranks: every rank hashing every file (one process's
check, run by all) against each rank hashing its share (``trainer.checkpoint.manifest.damage_together``,
what a resume does). Prints the wall time of each (the slowest rank's) and the bytes each rank reads.

    .venv/bin/python benchmarks/checkpoint_verify.py STEP_DIR [--ranks 4] [--repeats 3]

STEP_DIR is a saved step directory (``<run_dir>/checkpoints/step_<n>``). The ranks are gloo processes on
this machine; the files are read once before timing, so both schemes read from the page cache and the
numbers are hashing on the CPU cores the ranks share (a cold read from disk adds the same bytes over the
disk's bandwidth to each).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.checkpoint import manifest
from trainer.parallel.mappings import gather_objects
from trainer.runtime.env import free_port


def timed(fn) -> float:
    """Wall seconds from a common start until the last rank is done."""
    dist.barrier()
    start = time.perf_counter()
    assert fn() is None, "the checkpoint is damaged"
    dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, world: int, port: int, step_dir: Path, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(600))
    sizes = manifest.sizes_of(step_dir)
    schemes = {  # name: (what each rank runs, bytes it reads)
        "resume before: every rank hashes every file": (lambda: manifest.damage(step_dir), sum(sizes.values())),
        "save before: rank 0 hashes every file": (
            lambda: manifest.damage(step_dir) if rank == 0 else None,
            sum(sizes.values()) if rank == 0 else 0,
        ),
        "save and resume now: each rank its share": (
            lambda: manifest.damage_together(step_dir, rank, world),
            sum(sizes[n] for n in manifest.share(sizes, rank, world)),
        ),
    }
    rows = []
    for name, (fn, nbytes) in schemes.items():
        seconds = statistics.median(timed(fn) for _ in range(repeats))
        rows.append(f"| {name} | {seconds:.2f} | {max(gather_objects(nbytes)) / 1e6:,.0f} |")
    if rank == 0:
        total = sum(sizes.values()) / 1e6
        print(f"{step_dir.name}: {len(sizes)} files, {total:,.0f} MB; {world} ranks; median of {repeats}")
        print("| scheme | seconds (slowest rank) | MB the busiest rank reads |\n|---|---|---|")
        print("\n".join(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step_dir", type=Path)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    why = manifest.damage(args.step_dir)  # also reads every file once: both schemes start from the page cache
    if why is not None:
        raise SystemExit(f"{args.step_dir}: {why}")
    mp.start_processes(
        rank_main, (args.ranks, free_port(), args.step_dir, args.repeats), nprocs=args.ranks, start_method="spawn"
    )


if __name__ == "__main__":
    main()
