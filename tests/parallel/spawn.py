"""Run a function on N gloo ranks in fresh processes (``torch.multiprocessing.start_processes``).

    run_ranks(check, 4, "arg")   # calls check(rank, world_size, "arg") on ranks 0..3

The function must be importable by name (module level in a test module). A failure on any rank
re-raises in the caller with that rank's traceback, and the other ranks are terminated.

Ranks start with the "forkserver" method: like "spawn" they never inherit the test process's
threads or distributed state, but they fork from one server that has imported torch once, so a
rank starts in a fraction of a second instead of re-importing torch (seconds per rank on 2 cores).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.runtime.env import free_port


def run_ranks(fn: Callable[..., None], world_size: int, *args, timeout_s: float = 120.0) -> None:
    mp.set_forkserver_preload(["torch", "torch.distributed", "pytest"])  # takes effect when the server starts
    mp.start_processes(
        _worker,
        args=(fn, world_size, free_port(), timeout_s, args),
        nprocs=world_size,
        join=True,
        start_method="forkserver",
    )


def _worker(rank: int, fn, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    # Up to 4 ranks share 2 cores in CI: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),  # a rank stuck in a collective fails instead of hanging
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def start_deepspeed(rank: int, world: int):
    """Adopt the spawned gloo group as DeepSpeed's (without its CPU shared-memory op, as the trainer)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    import deepspeed  # heavy: only in the ranks

    from trainer.runtime.compat import skip_shm_comm_op

    skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed
