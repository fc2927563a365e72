"""Measured pipeline bubble beside (p-1)/m: trains a small GPT at pp=2 and pp=4 with m=4 and 8
micro-batches per step through the deepspeed launcher and prints each stage's idle share.

    .venv/bin/python benchmarks/pipeline_bubble.py [extra overrides...]

Idle = step time minus forward/backward/optimizer compute on that stage. Compare idle/step with
(p-1)/(m+p-1) and idle/compute with (p-1)/m (Narayanan et al. 2021). On a 2-core CPU the stages
share cores, so numbers there show the shape of the effect more than its size.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.runtime.env import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "model=gpt-tiny",
    "model.n_layer=8",
    "model.seq_len=128",
    "data.tokenizer.vocab_size=8192",
    "parallel.micro_batch=4",
    "train.steps=8",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.save_interval=-1",
    "logging.wandb.mode=disabled",
]


def run(pp: int, m: int, extra: list[str]) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bubble-pp{pp}-m{m}-"))
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(pp),
        "--no_local_rank",
        "--master_port",
        str(free_port()),
        "--module",
        "trainer.train",
        *BASE,
        f"parallel.pp={pp}",
        f"parallel.global_batch={4 * m}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "pipe_idle_fraction" in r][2:]  # skip warm-up steps


def main() -> None:
    print("| p | m | idle/step measured (per stage) | (p-1)/(m+p-1) | idle/compute measured | (p-1)/m |")
    print("|---|---|---|---|---|---|")
    for pp in (2, 4):
        for m in (4, 8):
            steps = run(pp, m, sys.argv[1:])
            idle = [statistics.median(r["pipe_idle_fraction"][s] for r in steps) for s in range(pp)]
            ratio = [statistics.median(r["pipe_bubble_ratio"][s] for r in steps) for s in range(pp)]
            print(
                f"| {pp} | {m} | {', '.join(f'{x:.3f}' for x in idle)} | "
                f"{steps[0]['pipe_idle_fraction_analytic']:.3f} | {', '.join(f'{x:.3f}' for x in ratio)} | "
                f"{steps[0]['pipe_bubble_ratio_analytic']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
