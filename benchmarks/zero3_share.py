"""A model no rank could hold whole, trained, saved, resumed and resharded at ZeRO-3 on this machine, with
every rank's peak resident memory beside the planner's prediction for its layout.

    .venv/bin/python benchmarks/zero3_share.py [--work DIR] [model=gpt2-large] [extra overrides...]

Runs (each through the deepspeed launcher, every rank's RSS sampled from outside every 0.2 s):
    1. 4 ranks, ZeRO-3: 2 steps, then a save
    2. 4 ranks, ZeRO-3: resume at the same layout, 1 step
    3. 2 ranks, ZeRO-3: resume resharded from the 4-rank checkpoint, 1 step
and prints per run: each rank's peak, the planner's per-rank prediction (``python -m trainer.plan`` on
cluster=cpu-local with the same model, batch and world), their ratio, and the sum over ranks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.checkpoint_memory import MB, checkpoint_records, launch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = ["model.seq_len=64", "parallel.micro_batch=1", "parallel.global_batch=4"]


def predicted_gb(model: list[str], world: int) -> float:
    """The planner's per-rank memory for tp1·pp1·dp<world> ZeRO-3, micro-batch 1, no recompute."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "trainer.plan", *model, "model.seq_len=64", "parallel.global_batch=4"]
        cmd += [f"cluster.gpus_per_node={world}", f"plan.out={out.name}", "plan.top=1"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        layouts = json.loads(Path(out.name).read_text())["layouts"]
    want = {"tp": 1, "pp": 1, "zero_stage": 3, "micro_batch": 1, "recompute": "none", "sequence_parallel": False}
    return next(p["mem_per_gpu_gb"] for p in layouts if all(p[k] == v for k, v in want.items()))


def report(name: str, watch, predicted: float, run_dir: Path) -> None:
    peaks = [watch.peaks[r] / 1e9 for r in sorted(watch.peaks)]
    ratios = ", ".join(f"{p / predicted:.2f}" for p in peaks)
    listed = ", ".join(f"{p:.2f}" for p in peaks)
    print(f"| {name} | {listed} | {predicted:.2f} | {ratios} | {watch.total_peak / 1e9:.1f} |")
    for rec in checkpoint_records(run_dir):
        grown = [(p - b) / MB for p, b in zip(rec["checkpoint_peak_rss_bytes"], rec["checkpoint_rss_before_bytes"])]
        print(
            f"|   {rec['checkpoint_io']} step {rec['step']} | {max(rec['checkpoint_s']):.0f} s | "
            f"+{max(grown):,.0f} MB peak over before | {max(rec['checkpoint_state_bytes']) / MB:,.0f} MB/rank | |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="keep the runs (logs, checkpoints) here; default: a temporary directory")
    args, overrides = parser.parse_known_args()
    model = [a for a in overrides if a.startswith("model=")] or ["model=gpt2-large"]
    extra = [a for a in overrides if not a.startswith("model=")]
    common = [*model, *BATCH, "parallel=zero3", "train.eval_batches=1", "train.eval_interval=0", *extra]
    common += ["logging.progress=false"]
    print(f"{' '.join(common)}\n")
    print("| run | peak RSS per rank GB | planner GB/rank | measured / planner | sum of peaks GB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        first, second = work / "dp4", work / "dp2"
        _, watch = launch(REPO, first, [*common, "train.steps=2"])
        report("4 ranks: 2 steps + save", watch, predicted_gb(model, 4), first)
        _, watch = launch(REPO, first, [*common, "train.steps=3", "train.resume=auto", "train.save_interval=-1"])
        report("4 ranks: resume, 1 step", watch, predicted_gb(model, 4), first)
        resume = f"train.resume={first / 'checkpoints'}"
        _, watch = launch(REPO, second, [*common, "train.steps=3", resume, "train.save_interval=-1"], ranks=2)
        report("2 ranks: resharded resume, 1 step", watch, predicted_gb(model, 2), second)


if __name__ == "__main__":
    main()
