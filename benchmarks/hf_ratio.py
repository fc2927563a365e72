"""The trainer on one process against Hugging Face's GPT-2 with torch's AdamW at the same shape, batch and
precision: tokens/s, alternating runs, the median ratio.

    .venv/bin/python benchmarks/hf_ratio.py [--pairs 5] [--steps 24] [--hf-steps 12] [overrides...]
    .venv/bin/python benchmarks/hf_ratio.py model.n_layer=8 model.n_embd=512 speed.fused_adamw=true

Each pair runs ``python -m trainer.train`` (parallel=single) and, in a fresh process, a plain loop over
``transformers.GPT2LMHeadModel`` built at the trained model's shape (benchmarks/gpu_check.py ``hf_gpt2``: the
padded vocabulary, no dropout, SDPA attention, torch's AdamW as it comes, fused only on CUDA), in alternating
order (odd pairs start with Hugging Face). The trainer's throughput is the median of its logged windows after
the first two; Hugging Face's the median step after three warm-up steps. Overrides go to the trainer (model
shape, speed options); a pair's ratio is trainer / Hugging Face, and the result is the median over pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import hf_gpt2, run_numbers  # noqa: E402  (the same measurement as the GPU check)

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "model=gpt-tiny",
    "model.seq_len=128",
    "parallel.micro_batch=4",
    "parallel.global_batch=8",
    "train.eval_interval=0",
    "train.eval_batches=1",
    "train.save_interval=-1",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def trainer_run(steps: int, extra: list[str]) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="hf-ratio-"))
    args = [*BASE, f"train.steps={steps}", f"train.log_interval={max(steps // 6, 1)}", *extra]
    subprocess.run([sys.executable, "-m", "trainer.train", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    return run_dir


def hf_run(run_dir: Path, steps: int) -> float:
    """Hugging Face's tokens/s at ``run_dir``'s shape, measured in a process of its own."""
    cmd = [sys.executable, __file__, "--hf-only", str(run_dir), "--hf-steps", str(steps)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--hf-steps", type=int, default=12)
    parser.add_argument("--hf-only", type=Path, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.hf_only:
        cfg = yaml.safe_load((args.hf_only / "config.yaml").read_text())
        print(json.dumps(hf_gpt2(cfg, args.hf_steps)))
        return
    print(f"trainer overrides: {' '.join(extra) or '(none)'}")
    print("| pair | trainer tok/s | Hugging Face tok/s | ratio |")
    print("|---|---|---|---|")
    ratios, run_dir = [], None
    for pair in range(args.pairs):
        if run_dir is not None and pair % 2:  # odd pairs: Hugging Face first, at the shape the trainer ran
            theirs = hf_run(run_dir, args.hf_steps)
            run_dir = trainer_run(args.steps, extra)
        else:
            run_dir = trainer_run(args.steps, extra)
            theirs = hf_run(run_dir, args.hf_steps)
        ours = run_numbers(run_dir)["tokens_per_s"]
        ratios.append(ours / theirs)
        print(f"| {pair + 1} | {ours:,.0f} | {theirs:,.0f} | {ratios[-1]:.2f} |", flush=True)
    print(f"median ratio (trainer / Hugging Face): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
