"""Measure this machine for ``cluster=cpu-local``: cores, RAM, matmul peak, memory bandwidth, the
bandwidth and latency of a gloo all-reduce between two local processes (what CPU ranks talk over), and
the memory gloo's all-gather and reduce-scatter keep beyond the caller's buffers (ZeRO's collectives).

Everything together takes a few seconds; a gloo measurement that fails or exceeds its time limit is
replaced by a stated estimate (loopback TCP on a laptop: about 1 GB/s and 100 µs per step).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import replace

from trainer.analysis.planner.config import ClusterConfig
from trainer.runtime.env import free_port

ESTIMATE_BW_GBS, ESTIMATE_LATENCY_US = 1.0, 100.0
ESTIMATE_OVERHEADS = {"gather": 4.0, "scatter": 2.5}  # torch 2.x's gloo with glibc, measured on a 2-core EPYC
MESSAGE_BYTES = 16 * 2**20  # large enough that bandwidth, not latency, dominates
TIMEOUT_S = 60.0
CALLS = 5  # of each collective whose memory is measured (what glibc keeps varies by about one copy per run)


def _overhead_worker(rank: int, port: int, queue, kind: str) -> None:
    """One of two gloo ranks: how much this process's peak RSS grows, per byte of the full buffer, over a
    few calls of one collective, as ZeRO repeats it every step. gloo gathers and scatters through per-rank
    temporaries, and glibc keeps the freed ones, so the growth is larger than a single call's."""
    import warnings

    import torch
    import torch.distributed as dist

    from trainer.runtime.hardware import peak_rss_since_reset, reset_peak_rss

    # newer torch deprecates these names; they are the ones DeepSpeed 0.19 calls, so they are measured
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    full, shard = torch.ones(MESSAGE_BYTES // 4), torch.ones(MESSAGE_BYTES // 8)
    dist.barrier()
    reset_peak_rss()
    before = peak_rss_since_reset()
    for _ in range(CALLS):
        if kind == "gather":
            dist.all_gather_into_tensor(full, shard)
        else:
            dist.reduce_scatter_tensor(shard, full)
    grown = peak_rss_since_reset() - before
    dist.destroy_process_group()
    if rank == 0:
        queue.put((kind, grown / MESSAGE_BYTES))


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


def _run_pairs(target, extra_args: list[tuple]) -> list | None:
    """Start one pair of gloo processes per entry of ``extra_args`` (at once) and collect what each
    pair's rank 0 reports; None when any fails or exceeds the time limit."""
    ctx = mp.get_context("spawn")  # forking a process that already ran torch kernels can hang
    queue, procs = ctx.Queue(), []
    for extra in extra_args:
        port = free_port()
        procs += [ctx.Process(target=target, args=(r, port, queue, *extra), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return [queue.get(timeout=TIMEOUT_S) for _ in extra_args]
    except Exception:
        return None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def gloo_allreduce() -> tuple[float, float] | None:
    """(bytes/s per rank, seconds per ring step) of a 2-process gloo all-reduce, or None on failure.

    A 2-rank ring all-reduce sends the message once each way (2(n-1)/n = 1) in 2 steps.
    """
    got = _run_pairs(_allreduce_worker, [()])
    if got is None:
        return None
    big_s, tiny_s = got[0]
    return MESSAGE_BYTES / max(big_s - tiny_s, 1e-9), tiny_s / 2


def gloo_overheads() -> dict[str, float] | None:
    """Resident bytes gloo's all-gather and reduce-scatter add per byte of the full buffer (both pairs run
    at once: memory, unlike time, is not disturbed by sharing the cores), or None on failure -- at once
    where the peak RSS cannot be reset (not Linux), instead of after the workers' time limit."""
    import os

    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    got = _run_pairs(_overhead_worker, [("gather",), ("scatter",)])
    return dict(got) if got else None


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

    from trainer.runtime.hardware import measured_matmul_peak

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    ram = psutil.virtual_memory().total
    fp32, bf16 = measured_matmul_peak(torch.float32, seconds=0.3), measured_matmul_peak(torch.bfloat16, seconds=0.3)
    mem_bw = memory_bandwidth()
    gloo = gloo_allreduce()
    bw, lat = gloo if gloo else (ESTIMATE_BW_GBS * 1e9, ESTIMATE_LATENCY_US * 1e-6)
    how = "measured (2 gloo processes)" if gloo else "estimated (gloo measurement failed)"
    overheads = gloo_overheads()
    extra = overheads or ESTIMATE_OVERHEADS
    extra_how = "measured" if overheads else "estimated (measurement failed)"
    notes = (
        f"{cores} cores, {ram / 1e9:.1f} GB RAM, matmul peak {fp32 / 1e9:.0f} GFLOP/s fp32 / {bf16 / 1e9:.0f} bf16, "
        f"memory {mem_bw / 1e9:.1f} GB/s (measured)",
        f"all-reduce {bw / 1e9:.2f} GB/s, {lat * 1e6:.0f} µs per step: {how}; shared by {ranks} ranks",
        f"gloo temporaries per byte: all-gather {extra['gather']:.2f}, reduce-scatter {extra['scatter']:.2f} "
        f"({extra_how})",
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
        gather_overhead=extra["gather"],
        scatter_overhead=extra["scatter"],
    )
    return measured, notes
