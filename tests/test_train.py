"""The real entry point end to end: run files, metrics, multirun, and ZeRO parity through the launcher."""

from __future__ import annotations

import json
import subprocess
import sys

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
    cmd = [sys.executable, "-m", "trainer.train", "-m", "parallel.zero_stage=1,2,3", "train.steps=2",
           *_smoke(data_cache), f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, stage in enumerate((1, 2, 3)):
        ds = json.loads((sweep / str(job) / "ds_config.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert len([r for r in read_metrics(sweep / str(job)) if "loss" in r]) == 2


PARITY_STEPS = 5


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, data_cache):
    """One process, global batch 8 as 2 micro-batches of 4 (gradient accumulation)."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_train(run_dir, _smoke(data_cache, f"train.steps={PARITY_STEPS}", "parallel.micro_batch=4",
                                     "parallel.global_batch=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank_at_every_zero_stage(stage, tmp_path, data_cache, reference_losses):
    """2 ranks x micro 4 (no accumulation) == 1 rank x micro 4 x 2 accumulation steps, within 1e-5 (fp32)."""
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, _smoke(data_cache, f"train.steps={PARITY_STEPS}", f"parallel.zero_stage={stage}",
                                     "parallel.micro_batch=4", "parallel.global_batch=8"), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == len(reference_losses) == PARITY_STEPS
    deviation = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses))
    print(f"zero {stage}: losses {losses}, max relative deviation {deviation:.2e}")
    assert deviation < 1e-5
    assert losses[-1] < losses[0]  # it learns
