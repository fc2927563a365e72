"""Where a run's records go, on rank 0 only: metrics.jsonl in the run directory, wandb, and the console."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.enabled = enabled
        self.wandb_run = wandb_run
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1) if enabled else None
        self._t0 = time.time()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time_s": round(time.time() - self._t0, 3)}
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(_for_wandb(record), step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _for_wandb(record: dict[str, Any]) -> dict[str, Any]:
    """wandb charts nested dicts as namespaced keys but not lists of dicts: key each rank by name; samples
    become a ``wandb.Table``."""
    out = {k: v for k, v in record.items() if k not in ("step", "ranks")}
    for entry in record.get("ranks", []):
        out[f"rank{entry['rank']}"] = {k: v for k, v in entry.items() if k != "rank"}
    if "samples" in record:  # a table per validation pass: step, prompt, completion
        import wandb

        rows = [[record["step"], s["prompt"], s["completion"]] for s in record["samples"]]
        out["samples"] = wandb.Table(columns=["step", "prompt", "completion"], data=rows)
    return out


class Console:
    """Rank 0's view of training: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, total_steps: int, progress: bool):
        self.enabled = enabled
        self._bar = None
        if enabled and progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            print(line, flush=True)

    def advance(self, step: int, status: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
