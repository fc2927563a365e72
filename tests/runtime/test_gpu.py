"""On a CUDA GPU: nccl + bf16 training through the trainer, the flash kernel, torch's fused AdamW inside the
DeepSpeed engine, and the data-sheet peak of this device. Marked ``gpu``; skipped with the reason where torch
sees no GPU. ``bash benchmarks/gpu_check.sh`` runs them (``pytest -m gpu``) before its measurements."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, read_metrics, run_train, tiny_corpus_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def test_this_gpu_has_its_data_sheet_peak():
    from trainer.runtime.hardware import gpu_peaks, peak_flops

    name = torch.cuda.get_device_name(0)
    peaks = gpu_peaks(name)
    if peaks is None:
        pytest.skip(f"{name} is not in hardware.GPU_PEAK (its peak is measured at start)")
    assert peak_flops(torch.device("cuda", 0), "bf16") == peaks["bf16"]
    # a bf16 matmul reaches a good part of the data sheet's dense peak, so the table names the right part
    from trainer.runtime.hardware import measured_on_gpu

    measured = measured_on_gpu(torch.device("cuda", 0), "bf16")
    assert 0.3 * peaks["bf16"] < measured < 1.05 * peaks["bf16"], (name, measured)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 16, 128), (32, 8, 128), (4, 4, 64)])
def test_the_flash_kernel_runs_at_the_models_attention_shapes(heads, kv_heads, head_dim):
    from trainer.runtime.speed import probe_flash

    assert probe_flash(torch.device("cuda", 0), torch.bfloat16, heads, kv_heads, head_dim, 0.1) is None


def test_pinned_flash_attention_trains_in_bf16():
    """The model with its attention pinned to flash (what speed.flash_attention=auto does on CUDA in bf16):
    forward and backward run, and the profiler sees a flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.model import GPT, ModelShape
    from trainer.runtime.speed import use_flash

    shape = ModelShape(n_layer=2, n_embd=256, n_head=4, seq_len=256, vocab_size=512, dropout=0.1)
    model = GPT(shape, seed=1).cuda().to(torch.bfloat16)
    use_flash(model)
    idx = torch.randint(0, 512, (2, 257), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
    assert math.isfinite(loss.item())
    kernels = [event.key.lower() for event in prof.key_averages()]
    assert any("flash" in k for k in kernels), kernels[:20]


# Builds the engine as the trainer does on one GPU (nccl, bf16, ZeRO-1) and prints the optimizer's flags.
_ENGINE = """
import json, torch
from trainer.model import GPT, ModelShape
from trainer.runtime.engine import build_engine, init_distributed
from conftest import compose_config
from trainer.config.validate import validate
from trainer.runtime.ds_config import ds_config
cfg, _ = compose_config(["debug=smoke", "parallel.precision=bf16", "parallel.zero_stage=1", "train.device=cuda"])
ds = ds_config(cfg, validate(cfg, 1), cuda=True)
init_distributed(torch.device("cuda", 0), 120)
model = GPT(ModelShape(2, 64, 4, 32, 512), seed=1).cuda()
engine = build_engine(model, ds, 0.1, None)
opt = engine.optimizer
while not isinstance(opt, torch.optim.Optimizer) or not hasattr(opt, "defaults") or "fused" not in opt.defaults:
    opt = opt.optimizer
backend = torch.distributed.get_backend()
print(json.dumps({"fused": opt.defaults["fused"], "type": type(opt).__name__, "backend": backend}))
"""


def test_deepspeed_builds_torchs_fused_adamw():
    cmd = [sys.executable, "-c", _ENGINE]
    proc = subprocess.run(cmd, cwd=ROOT / "tests", env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"fused": True, "type": "AdamW", "backend": "nccl"}


def test_bf16_training_on_one_gpu_through_the_trainer(tmp_path, data_cache):
    """nccl + bf16 + ZeRO-1 on one GPU with every speed option at auto (flash, fused AdamW, overlap_comm)."""
    overrides = [
        "debug=smoke",
        *tiny_corpus_overrides(data_cache),
        "model.n_embd=256",  # head size 64
        "model.seq_len=256",
        "parallel.precision=bf16",
        "parallel.zero_stage=1",
        "train.device=cuda",
        "train.steps=20",
        "train.save_interval=-1",
    ]
    proc = run_train(tmp_path / "run", overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["optimizer"]["params"]["fused"] and ds["zero_optimization"]["overlap_comm"] and ds["bf16"]["enabled"]
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < steps[0]["loss"]
    assert 0 < steps[-1]["mfu"] < 1
