"""What the device can do: peak FLOP/s (for MFU) and peak memory of this process."""

from __future__ import annotations

import ctypes
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Dense peak FLOP/s per GPU from NVIDIA's data sheets (no sparsity; fp32 without TF32), by the part of
# ``torch.cuda.get_device_name`` that tells the variants apart. The first match wins, so the more specific
# names come first: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not.
# The planner's clusters (conf/cluster/*.yaml) state the same numbers (tests/runtime/test_device_peaks.py).
GPU_PEAK = {
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM (H100's compute, more and faster memory)
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "H100 PCIE": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM: "NVIDIA H100 80GB HBM3"
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},  # 40 and 80 GB, SXM4 and PCIe alike
}


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A CPU without native bf16/fp16 units (no AVX512-BF16, AMX or AVX512-FP16) multiplies in those types through
# torch's generic kernels: on an AVX2 EPYC, 0.9 GFLOP/s in bf16 against 116 in fp32. Below this fraction of
# the fp32 rate the run says so.
SLOW_LOW_PRECISION = 0.5


def gpu_peaks(device_name: str) -> dict[str, float] | None:
    """The data-sheet peaks (precision -> FLOP/s) of a GPU by its name, or None for a GPU not in GPU_PEAK."""
    name = device_name.upper().replace("-", " ")
    return next((peaks for model, peaks in GPU_PEAK.items() if model in name), None)


def measured_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on the CPU with this process's threads: the CPU's practical peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started)


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one rank's device: the data sheet for known GPUs, a measurement otherwise."""
    if device.type == "cuda":
        peaks = gpu_peaks(torch.cuda.get_device_name(device))
        return peaks[precision] if peaks else measured_on_gpu(device, precision)
    return measured_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)


def slow_cpu_precision(precision: str) -> str | None:
    """One line when this CPU multiplies in ``precision`` (bf16/fp16) at under SLOW_LOW_PRECISION of its fp32
    rate, so that a run which would crawl says why; None otherwise. Probes small matmuls (well under a second)."""
    if precision == "fp32":
        return None
    rate = {p: measured_matmul_peak(PRECISION_DTYPES[p], size=256, seconds=0.05) for p in (precision, "fp32")}
    if rate[precision] >= SLOW_LOW_PRECISION * rate["fp32"]:
        return None
    return (
        f"warning: {precision} matmuls run at {rate[precision] / 1e9:,.1f} GFLOP/s on this CPU against "
        f"{rate['fp32'] / 1e9:,.1f} in fp32 (no native {precision} units): parallel.precision=fp32 trains faster here"
    )


def measured_on_gpu(device: torch.device, precision: str, size: int = 8192) -> float:
    a = torch.randn(size, size, device=device, dtype=PRECISION_DTYPES[precision])
    torch.mm(a, a)
    torch.cuda.synchronize(device)
    started, runs = time.perf_counter(), 10
    for _ in range(runs):
        torch.mm(a, a)
    torch.cuda.synchronize(device)
    return 2 * size**3 * runs / (time.perf_counter() - started)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's high-water mark, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Large temporaries freed by
    torch stay resident otherwise (glibc raises its mmap threshold as they are freed), so a rank that
    built its ZeRO-3 shards one gathered parameter at a time would keep the gathers' memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# glibc's mallopt parameter for the mmap threshold, and the threshold of a lean heap: every allocation
# of 1 MiB or more gets its own mapping, unmapped when freed (a fixed threshold also stops glibc from
# raising it as large blocks are freed, which is what keeps freed temporaries resident otherwise).
_M_MMAP_THRESHOLD = -3
LEAN_MMAP_THRESHOLD = 1 << 20


def pin_mmap_threshold(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Make this process's C heap lean (see ``train.host_heap``); False where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM, so what came before does not hide what comes after); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset() -> int:
    """This process's peak resident memory in bytes since ``reset_peak_rss`` (VmHWM), or over its whole
    life where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def memory_window() -> Iterator[dict[str, float]]:
    """Measure the block: the yielded dict gets ``seconds``, ``rss_before_bytes`` and ``peak_rss_bytes``
    (this process's peak resident memory inside the block, where the peak can be reset)."""
    out: dict[str, float] = {"rss_before_bytes": current_rss_bytes()}
    resettable = reset_peak_rss()
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        out["peak_rss_bytes"] = peak_rss_since_reset() if resettable else float("nan")


def current_rss_bytes() -> int:
    """Resident memory of this process now (peak_memory_bytes gives the high-water mark on CPU)."""
    import psutil

    return psutil.Process().memory_info().rss


def machine_description() -> str:
    """One line for reports: CPU model and cores (or GPUs), memory, torch and DeepSpeed versions."""
    import platform

    import deepspeed
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f"{cpu}, {psutil.cpu_count()} cores"
    if torch.cuda.is_available():
        device += f", {torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    memory = psutil.virtual_memory().total / 2**30
    return f"{device}, {memory:.0f} GiB RAM, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}"
