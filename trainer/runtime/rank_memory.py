"""Resident memory of every rank of a launch, sampled from outside: the measurement a test or a benchmark
compares with a rank's share (and with the planner), whatever the code inside the ranks does.

    with RankMemory(launcher_pid) as watch:
        ...                                  # the launch runs
    watch.peaks                              # {rank: peak RSS in bytes}

Ranks are the launcher's descendant processes that carry a ``RANK`` variable; each is sampled every
``interval_s`` seconds (``psutil``), so a peak shorter than that can be missed: in-process numbers
(``trainer.runtime.hardware.memory_window``) are exact, these are comparable across code versions.
"""

from __future__ import annotations

import threading

import psutil


class RankMemory:
    def __init__(self, root_pid: int, interval_s: float = 0.2):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.peaks: dict[int, int] = {}
        self.total_peak = 0  # the largest sum over ranks seen in one sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RankMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[int, int]:
        """{rank: RSS now} of the ranks alive now."""
        try:
            processes = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        out: dict[int, int] = {}
        for proc in processes:
            try:
                rank = proc.environ().get("RANK")
                if rank is not None and rank.isdigit():
                    out[int(rank)] = max(out.get(int(rank), 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = self.sample()
            for rank, rss in now.items():
                self.peaks[rank] = max(self.peaks.get(rank, 0), rss)
            self.total_peak = max(self.total_peak, sum(now.values()))
