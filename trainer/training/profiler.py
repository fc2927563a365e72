"""``train.profile_*``: torch.profiler over a few optimizer steps of chosen ranks (what Megatron-LM's
``--profile`` and torchtitan's profiling section do), so time can be placed kernel by kernel.

Each profiled rank writes ``profile/rank<r>.json`` (a Chrome/Perfetto trace) and ``profile/rank<r>.txt`` (the
operators by self time on the device, or on the CPU for CPU ranks) into the run directory. The profiled steps
pay the profiler's overhead: their logged speed is not the run's. On a GPU the line that says where the trace is
also says how much of the profiled window the device was busy: the idle rest is what launch overhead and host
synchronisations cost, the first thing to look at when MFU is low.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPERATORS = 40  # rows of the text summary
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # trace events that occupy the GPU


def device_busy(events: list[dict]) -> tuple[float, float] | None:
    """(busy, window) in ms from a Chrome trace's events: the union of the device's kernel and copy intervals,
    and the profiled window (first to last event of any kind); None for a trace without device events."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and "dur" in e)
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e)
    if not device:
        return None
    busy, end = 0.0, float("-inf")
    for start, stop in device:  # overlapping kernels (several streams) count once
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = max(stop for _, stop in spans) - spans[0][0]
    return busy / 1e3, window / 1e3


class StepProfiler:
    """Profiles optimizer steps ``start .. start + steps - 1`` (1-based) on this rank when it is one of ``ranks``;
    ``start`` 0 profiles nothing."""

    def __init__(self, start: int, steps: int, ranks: list[int], rank: int, device: torch.device, run_dir: Path):
        self.first, self.last = start, start + steps - 1
        self.on = start > 0 and rank in ranks
        self.rank, self.cuda = rank, device.type == "cuda"
        self.out = Path(run_dir) / "profile"
        self._prof = None

    @classmethod
    def off(cls) -> StepProfiler:
        return cls(0, 1, [], 0, torch.device("cpu"), Path("."))

    def step_begins(self, step: int) -> None:
        if self.on and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()

    def step_ends(self, step: int) -> str | None:
        """After step ``step``: at the last profiled step, stop and write; the line saying where."""
        if self._prof is None or step < self.last:
            return None
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.out.mkdir(parents=True, exist_ok=True)
        trace, table = self.out / f"rank{self.rank}.json", self.out / f"rank{self.rank}.txt"
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        busy = device_busy(json.loads(trace.read_text())["traceEvents"]) if self.cuda else None
        occupancy = f"the GPU busy {busy[0]:.0f} of {busy[1]:.0f} ms ({busy[0] / busy[1]:.0%})" if busy else ""
        top = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS)
        table.write_text((occupancy + "\n" if occupancy else "") + top + "\n")
        where = f"profile of steps {self.first}-{self.last} (rank {self.rank}): {trace}, top operators in {table}"
        return where + (f"; {occupancy}" if occupancy else "")

    def close(self) -> None:
        """A run that ends inside the profiled steps stops the profiler without writing."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
