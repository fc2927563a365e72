"""Checkpoint cost per rank: save and load time, bytes written, and resident memory, per layout.

    .venv/bin/python benchmarks/checkpoint_memory.py [--repo DIR] [--layouts zero1 zero3 pp2 tp2] [overrides...]

For each layout (4 ranks, gpt2-medium at seq 64 by default) it trains one step and saves, then resumes at
the same layout for one more step. Each rank's resident memory is sampled from outside during both runs
(``trainer.runtime.rank_memory``), so ``--repo`` may point at another checkout of the trainer (an older
version) and the numbers compare; where the trainer logs its checkpoint records (metrics.jsonl), their
exact times, bytes and in-process peaks are printed too. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.runtime.env import free_port  # noqa: E402
from trainer.runtime.rank_memory import RankMemory  # noqa: E402

MB = 2**20
LAYOUTS = {"zero1": ["parallel=zero1"], "zero3": ["parallel=zero3"], "pp2": ["parallel=pp2"], "tp2": ["parallel=tp2"]}
MODEL = ["model=gpt2-medium", "model.seq_len=64", "parallel.micro_batch=1", "parallel.global_batch=4"]


def launch(repo: Path, run_dir: Path, overrides: list[str], ranks: int = 4) -> tuple[float, RankMemory]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(free_port())]
    cmd += ["--module", "trainer.train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        with RankMemory(proc.pid) as watch:
            code = proc.wait()
    if code != 0:  # the log lives in a temporary directory: show its end here
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{run_dir.name} failed (exit {code}); the end of its log:\n" + "\n".join(tail))
    return time.perf_counter() - start, watch


def checkpoint_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if "checkpoint_io" in r]


def measure(repo: Path, layout: str, extra: list[str], work: Path) -> dict:
    run_dir = work / layout
    common = [*MODEL, *LAYOUTS[layout], *extra, "train.eval_batches=1", "train.eval_interval=0"]
    common += ["logging.progress=false"]
    save_s, saving = launch(repo, run_dir, [*common, "train.steps=1"])
    load_s, loading = launch(repo, run_dir, [*common, "train.steps=2", "train.resume=auto", "train.save_interval=-1"])
    step_dir = run_dir / "checkpoints" / "step_1"
    written = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    return {
        "layout": layout,
        "run_s": (save_s, load_s),
        "peak_mb": (max(saving.peaks.values()) / MB, max(loading.peaks.values()) / MB),
        "sum_peak_mb": (saving.total_peak / MB, loading.total_peak / MB),
        "step_dir_mb": written / MB,
        "records": checkpoint_records(run_dir),
    }


def row(m: dict) -> str:
    cells = [m["layout"], f"{m['step_dir_mb']:,.0f}"]
    cells += [
        f"{m['peak_mb'][0]:,.0f} / {m['sum_peak_mb'][0]:,.0f}",
        f"{m['peak_mb'][1]:,.0f} / {m['sum_peak_mb'][1]:,.0f}",
    ]
    for kind in ("save", "load"):
        rec = next((r for r in m["records"] if r["checkpoint_io"] == kind), None)
        if rec is None:
            cells += ["–"]
            continue
        grown = max(p - b for p, b in zip(rec["checkpoint_peak_rss_bytes"], rec["checkpoint_rss_before_bytes"]))
        state = max(rec["checkpoint_state_bytes"]) / MB
        cells += [f"{max(rec['checkpoint_s']):.1f} s, {round(grown / MB) + 0:+,} MB, {state:,.0f} MB state/rank"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(f"trainer at {args.repo}: {' '.join(MODEL + args.overrides)}, 4 ranks")
    print(
        "| layout | step dir MB | peak RSS MB, max rank / sum (1 step + save) | (resume + 1 step) "
        "| save (in-run) | load (in-run) |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for layout in args.layouts:
            print(row(measure(args.repo.resolve(), layout, args.overrides, Path(work))), flush=True)


if __name__ == "__main__":
    main()
