"""The trainer on one rank against a plain PyTorch loop of the identical model: throughput ratio.

    .venv/bin/python benchmarks/baseline_ratio.py [--pairs 5] [--steps 20] [overrides...]

Runs ``python -m trainer.baseline`` and ``python -m trainer.train`` (parallel=single, one process) in
alternating order, ``--pairs`` times each, on the same model, data and batch. Each run logs every
``--steps``/4 steps; between logged steps the loops run uninstrumented, and each logged record carries
the throughput of that window, per wall second (``window_tokens_per_s``) and per CPU second of the
process (``window_tokens_per_cpu_s``). A run's throughput is the median of its windows after the first
(warm-up), the ratio of a pair is trainer / baseline, and the result is the median ratio. Other processes
on a shared machine slow the wall-clock numbers (both loops alike within a pair, on average; the median
discards outlier pairs); the CPU-time ratio is what they change least, so it isolates the loops' overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "model=gpt-tiny",
    "model.seq_len=128",
    "data=shakespeare",
    "parallel.micro_batch=2",
    "parallel.global_batch=16",
    "train.eval_interval=0",
    "train.eval_batches=2",
    "train.save_interval=-1",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def run(module: str, steps: int, extra: list[str]) -> tuple[float, float]:
    """Median window throughput of one run of ``module`` after its first logged window: tokens per wall
    second and per CPU second."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"ratio-{module.rsplit('.', 1)[-1]}-"))
    args = [*BASE, f"train.steps={steps}", f"train.log_interval={max(steps // 4, 1)}", *extra]
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "window_tokens_per_s" in r][2:]  # skip the first step and warm-up window
    keys = ("window_tokens_per_s", "window_tokens_per_cpu_s")
    return tuple(statistics.median(r[key] for r in windows) for key in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args, extra = parser.parse_known_args()
    print("| pair | baseline tok/s | trainer tok/s | ratio | baseline tok/CPU-s | trainer tok/CPU-s | ratio |")
    print("|---|---|---|---|---|---|---|")
    wall, cpu = [], []
    for pair in range(args.pairs):
        order = ("trainer.baseline", "trainer.train") if pair % 2 == 0 else ("trainer.train", "trainer.baseline")
        speed = {module: run(module, args.steps, extra) for module in order}
        (base_wall, base_cpu), (ours_wall, ours_cpu) = speed["trainer.baseline"], speed["trainer.train"]
        wall.append(ours_wall / base_wall)
        cpu.append(ours_cpu / base_cpu)
        print(
            f"| {pair + 1} | {base_wall:,.0f} | {ours_wall:,.0f} | {wall[-1]:.3f} | "
            f"{base_cpu:,.0f} | {ours_cpu:,.0f} | {cpu[-1]:.3f} |",
            flush=True,
        )
    for name, ratios in (("wall-clock", wall), ("CPU-time", cpu)):
        print(
            f"{name} ratio trainer/baseline: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.pairs} pairs)"
        )


if __name__ == "__main__":
    main()
