"""The Python half of ``benchmarks/gpu_check.sh`` (docs/gpu.md): the environment line, and the report of a
trainer run beside the planner's prediction for its layout and Hugging Face's GPT-2 at the same shape.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py report RUN_DIR [--hf-steps 30] [--out FILE.json]
    python benchmarks/gpu_check.py numbers RUN_DIR BASELINE_DIR --label TEXT   # one table row, vs the baseline

``report`` reads the run's resolved config and metrics.jsonl (tokens/s and MFU: the median of the logged steps
after the first two; peak memory: the largest logged, the CUDA allocator's high-water mark), asks ``python -m
trainer.plan`` for the same layout on the matching cluster (conf/cluster: h100-sxm, h200, a100-80gb, a100-40gb;
none on CPU), then trains ``transformers.GPT2LMHeadModel`` built from a config of the same shape (the padded
vocabulary, no dropout, SDPA attention) with torch's AdamW (fused on CUDA) under bf16 autocast (fp32 on CPU), at
the run's micro-batch and accumulation, and prints one table with the ratio trainer / Hugging Face.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch.cuda.get_device_name -> the planner's cluster of that GPU (trainer.runtime.hardware names the parts).
# PCIe and NVL H100/H200 parts have lower peaks than any cluster file states: no prediction for them.
CLUSTERS = (
    ("H200-NVL", None), ("H200", "h200"), ("H100-PCIE", None), ("H100-NVL", None), ("H100", "h100-sxm"),
    ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"),
)  # fmt: skip


def environment() -> str:
    import deepspeed
    import torch
    import transformers

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        driver = _nvidia_smi("driver_version")
        gpu = (
            f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB), "
            f"driver {driver}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        gpu = "no GPU (CPU only)"
    return (
        f"{gpu} | torch {torch.__version__} | deepspeed {deepspeed.__version__} | "
        f"transformers {transformers.__version__} | python {sys.version.split()[0]}"
    )


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def run_numbers(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    measured = steps[2:] or steps[-1:]  # the first step and the first window warm up (allocator, kernels)
    return {
        "tokens_per_s": statistics.median(r["window_tokens_per_s"] for r in measured),
        # a logged step's own mfu is of that step alone, which pays for the logging; scale it to the window's rate
        "mfu": statistics.median(r["mfu"] * r["window_tokens_per_s"] / r["tokens_per_s"] for r in measured),
        "peak_mem_gb": max(r["peak_mem_mb"] for r in steps) * 2**20 / 1e9,
        "final_loss": steps[-1]["loss"],
        "steps": steps[-1]["step"],
    }


def planner_prediction(cfg: dict, cluster: str | None, zero_stage: int) -> dict | None:
    """The planner's memory and tokens/s for the run's layout on ``cluster`` (one GPU), or None. ``zero_stage``:
    the stage DeepSpeed ran (ds_config.json; speed.flat_optimizer runs ZeRO-1 at dp 1 for ZeRO-0)."""
    if cluster is None:
        return None
    m, p = cfg["model"], cfg["parallel"]
    out = Path(tempfile.mkdtemp(prefix="gpu-check-plan-")) / "plan.json"
    sizes = ("seq_len", "vocab_size", "n_layer", "n_embd", "make_vocab_size_divisible_by")
    model = [f"model={m['name']}"] + [f"model.{k}={m[k]}" for k in sizes]
    cmd = [
        sys.executable, "-m", "trainer.plan", *model, f"cluster={cluster}", "cluster.nodes=1",
        "cluster.gpus_per_node=1", f"parallel.global_batch={p['global_batch']}",
        f"parallel.precision={p['precision']}", f"plan.out={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"planner failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    want = {"tp": 1, "pp": 1, "zero_stage": zero_stage, "micro_batch": p["micro_batch"], "recompute": "none"}
    for layout in json.loads(out.read_text())["layouts"]:
        if all(layout.get(k) == v for k, v in want.items()):
            # The trainer logs the CUDA allocator's high-water mark: compare it with what the planner says is
            # allocated (states, activations, buffers), not with its total (+ fragmentation and reserved context).
            margin = layout["mem_gb"]["margin"]
            total = layout["mem_per_gpu_gb"]
            return {
                "tokens_per_s": layout["tokens_per_s"],
                "mfu": layout["mfu"],
                "mem_gb": total - margin,
                "total_gb": total,
            }
    return None


def hf_gpt2(cfg: dict, steps: int) -> dict:
    """Hugging Face's GPT-2 at the run's shape, batch and precision: median tokens/s after 3 warm-up steps."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.analysis.formulas import shape_flops_per_token
    from trainer.model.shape import ModelShape
    from trainer.runtime.hardware import peak_flops, peak_memory_bytes

    m, p = cfg["model"], cfg["parallel"]
    shape = ModelShape.from_config(argparse.Namespace(**m)).padded()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    config = GPT2Config(
        vocab_size=shape.vocab_size, n_positions=shape.seq_len, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=0, eos_token_id=0,  # GPT-2's 50256 is outside a smaller vocabulary; the ids play no part here
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    micro, accum = p["micro_batch"], p["global_batch"] // p["micro_batch"]
    # Mixed precision as Hugging Face runs it: fp32 weights under autocast, on CPU as on CUDA (no loss scaler for
    # fp16: only the speed is measured)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p["precision"])
    tokens = micro * accum * shape.seq_len
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(accum):
            idx = torch.randint(0, m["vocab_size"], (micro, shape.seq_len), device=device)
            with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
                loss = model(input_ids=idx, labels=idx).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    tokens_per_s = tokens / statistics.median(times[3:] or times)
    peak = peak_flops(device, p["precision"] if cuda else "fp32")
    memory = peak_memory_bytes(device) / 1e9  # as the trainer logs it: CUDA's allocator peak, or peak RSS
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * shape_flops_per_token(shape) / peak, "mem_gb": memory}


def cluster_of_this_gpu() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).upper().replace(" ", "-")
    return next((cluster for part, cluster in CLUSTERS if part in name), None)


def report(run_dir: Path, hf_steps: int, out: Path | None) -> None:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ours = run_numbers(run_dir)
    cluster = cluster_of_this_gpu()
    ran = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"]
    plan = planner_prediction(cfg, cluster, ran)
    hf = hf_gpt2(cfg, hf_steps)
    m, p = cfg["model"], cfg["parallel"]
    print(
        f"\n{m['name']} (l {m['n_layer']}, h {m['n_embd']}, s {m['seq_len']}, V {m['vocab_size']}), {p['precision']}, "
        f"micro {p['micro_batch']} x global {p['global_batch']}, ZeRO {p['zero_stage']}, run {run_dir}"
    )
    print("| | tokens/s | MFU | peak memory (GB) |")
    print("| --- | --- | --- | --- |")
    print(f"| trainer (measured) | {ours['tokens_per_s']:,.0f} | {ours['mfu']:.1%} | {ours['peak_mem_gb']:.1f} |")
    if plan:
        row = (
            f"| planner ({cluster}) | {plan['tokens_per_s']:,.0f} | {plan['mfu']:.1%} | {plan['mem_gb']:.1f} "
            f"allocated, {plan['total_gb']:.1f} with its margin |"
        )
    else:
        row = "| planner | no prediction (no conf/cluster file for this device, or the layout is not enumerated) | | |"
    print(row)
    print(f"| Hugging Face GPT-2 | {hf['tokens_per_s']:,.0f} | {hf['mfu']:.1%} | {hf['mem_gb']:.1f} |")
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    print(f"trainer / Hugging Face tokens/s: {ratio:.2f}; final loss {ours['final_loss']:.3f} after {ours['steps']}")
    if plan:
        print(
            f"trainer / planner: tokens/s {ours['tokens_per_s'] / plan['tokens_per_s']:.2f}, "
            f"peak allocated memory {ours['peak_mem_gb'] / plan['mem_gb']:.2f}"
        )
    if out:
        result = {"trainer": ours, "planner": plan, "hf_gpt2": hf, "ratio": ratio, "cluster": cluster}
        out.write_text(json.dumps({"environment": environment(), **result}, indent=2) + "\n")


def numbers_row(run_dir: Path, baseline_dir: Path, label: str) -> str:
    run, base = run_numbers(run_dir), run_numbers(baseline_dir)
    ratio = run["tokens_per_s"] / base["tokens_per_s"]
    return f"| {label} | {run['tokens_per_s']:,.0f} | {run['mfu']:.1%} | {run['peak_mem_gb']:.1f} | {ratio:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    rep = sub.add_parser("report")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--hf-steps", type=int, default=30)
    rep.add_argument("--out", type=Path)
    row = sub.add_parser("numbers")
    row.add_argument("run_dir", type=Path)
    row.add_argument("baseline_dir", type=Path)
    row.add_argument("--label", required=True)
    args = parser.parse_args()
    if args.command == "env":
        print(environment())
    elif args.command == "numbers":
        print(numbers_row(args.run_dir, args.baseline_dir, args.label))
    else:
        report(args.run_dir, args.hf_steps, args.out)


if __name__ == "__main__":
    main()
