"""The real entry point end to end: run files, metrics, multirun, and ZeRO parity through the launcher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env, read_metrics, run_train, tiny_corpus_overrides


def _smoke(data_cache, *extra: str) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), *extra]


def test_single_process_run_writes_everything(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=6", "train.eval_interval=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 2
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for record in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= record.keys()
        assert record["grad_norm"] is not None and record["grad_norm"] > 0
    assert [r["step"] for r in read_metrics(run_dir) if "val_loss" in r] == [3, 6]
    assert (run_dir / "checkpoints" / "step_6").is_dir()
    assert "parameters" in proc.stdout and str(run_dir) in proc.stdout


@pytest.mark.slow
def test_multirun_sweeps_zero_stages(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        "-m",
        "parallel.zero_stage=1,2,3",
        "train.steps=2",
        *_smoke(data_cache),
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, stage in enumerate((1, 2, 3)):
        ds = json.loads((sweep / str(job) / "ds_config.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert len([r for r in read_metrics(sweep / str(job)) if "loss" in r]) == 2


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_*")} if shm.is_dir() else set()


def test_launcher_run_leaves_no_shared_memory_behind(tmp_path, data_cache):
    # DeepSpeed's CPU shm all-reduce leaks a 66 MB /dev/shm file per rank per run; the trainer keeps it off.
    before = _shm_buffers()
    proc = run_train(tmp_path / "run", _smoke(data_cache, "train.steps=2", "parallel=dp"), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shm_buffers() - before == set()
    assert "shm_comm" not in proc.stdout + proc.stderr
