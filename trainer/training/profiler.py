"""``train.profile_*``: torch.profiler over a few optimizer steps of chosen ranks (what Megatron-LM's
``--profile`` and torchtitan's profiling section do), so time can be placed kernel by kernel.

Each profiled rank writes ``profile/rank<r>.json`` (a Chrome/Perfetto trace) and ``profile/rank<r>.txt`` (the
operators by self time on the device, or on the CPU for CPU ranks) into the run directory. The profiled steps
pay the profiler's overhead: their logged speed is not the run's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPERATORS = 40  # rows of the text summary


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
        table.write_text(prof.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS) + "\n")
        return f"profile of steps {self.first}-{self.last} (rank {self.rank}): {trace}, top operators in {table}"

    def close(self) -> None:
        """A run that ends inside the profiled steps stops the profiler without writing."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
