"""Measure this machine for ``cluster=cpu-local``: cores, RAM, matmul peak, memory bandwidth, and the
bandwidth and latency of a gloo all-reduce between two local processes (what CPU ranks talk over).

Everything together takes a few seconds; a gloo measurement that fails or exceeds its time limit is
replaced by a stated estimate (loopback TCP on a laptop: about 1 GB/s and 100 µs per step).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from dataclasses import replace

from trainer.planner.config import ClusterConfig

ESTIMATE_BW_GBS, ESTIMATE_LATENCY_US = 1.0, 100.0
MESSAGE_BYTES = 16 * 2**20  # large enough that bandwidth, not latency, dominates
TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, port: int, queue) -> None:
    """One of two gloo ranks: time a big all-reduce (bandwidth) and many tiny ones (latency)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    big, tiny = torch.ones(MESSAGE_BYTES // 4), torch.ones(1)
    dist.all_reduce(big)  # warm-up: connections, buffers
    started = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(big)
    big_s = (time.perf_counter() - started) / 3
    started = time.perf_counter()
    for _ in range(50):
        dist.all_reduce(tiny)
    tiny_s = (time.perf_counter() - started) / 50
    dist.destroy_process_group()
    if rank == 0:
        queue.put((big_s, tiny_s))


def gloo_allreduce() -> tuple[float, float] | None:
    """(bytes/s per rank, seconds per ring step) of a 2-process gloo all-reduce, or None on failure.

    A 2-rank ring all-reduce sends the message once each way (2(n-1)/n = 1) in 2 steps.
    """
    ctx = mp.get_context("spawn")  # forking a process that already ran torch kernels can hang
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        big_s, tiny_s = queue.get(timeout=TIMEOUT_S)
    except Exception:
        return None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return MESSAGE_BYTES / max(big_s - tiny_s, 1e-9), tiny_s / 2


def memory_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), the optimizer step's bound."""
    import torch

    src = torch.ones(32 * 2**20)  # 128 MB
    dst = torch.empty_like(src)
    dst.copy_(src)
    started, runs = time.perf_counter(), 5
    for _ in range(runs):
        dst.copy_(src)
    return 2 * src.numel() * 4 * runs / (time.perf_counter() - started)


def measured_cluster(c: ClusterConfig, ranks: int) -> tuple[ClusterConfig, tuple[str, ...]]:
    """``c`` with this machine's numbers (whole machine; the planner divides them among ``ranks``)."""
    import psutil
    import torch

    from trainer.hardware import measured_matmul_peak

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    ram = psutil.virtual_memory().total
    fp32, bf16 = measured_matmul_peak(torch.float32, seconds=0.3), measured_matmul_peak(torch.bfloat16, seconds=0.3)
    mem_bw = memory_bandwidth()
    gloo = gloo_allreduce()
    bw, lat = gloo if gloo else (ESTIMATE_BW_GBS * 1e9, ESTIMATE_LATENCY_US * 1e-6)
    how = "measured (2 gloo processes)" if gloo else "estimated (gloo measurement failed)"
    notes = (
        f"{cores} cores, {ram / 1e9:.1f} GB RAM, matmul peak {fp32 / 1e9:.0f} GFLOP/s fp32 / {bf16 / 1e9:.0f} bf16, "
        f"memory {mem_bw / 1e9:.1f} GB/s (measured)",
        f"all-reduce {bw / 1e9:.2f} GB/s, {lat * 1e6:.0f} µs per step: {how}; shared by {ranks} ranks",
    )
    measured = replace(
        c,
        gpus_per_node=ranks,
        gpu=f"CPU ({cores} cores)",
        cpu_cores=cores,
        mem_per_gpu_gb=ram / 1e9,
        peak_tflops_fp32=fp32 / 1e12,
        peak_tflops_bf16=bf16 / 1e12,
        peak_tflops_fp16=0.0,
        mem_bw_gbs=mem_bw / 1e9,
        intra_node_bw_gbs=bw / 1e9,
        intra_node_latency_us=lat * 1e6,
        # one machine: "inter-node" only matters for cluster.nodes > 1; assume 10 GbE between such machines
        inter_node_bw_gbs=min(bw / 1e9, 1.25),
        inter_node_latency_us=max(lat * 1e6, 50.0),
        comm_efficiency=1.0,  # the measurement already is what gloo achieves
    )
    return measured, notes
