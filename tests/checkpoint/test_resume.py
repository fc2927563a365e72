"""A run killed after a checkpoint and resumed with ``train.resume=auto`` continues exactly: the same samples,
learning rates, random numbers and loss scale, so the same per-step losses (bitwise on CPU, fp32, bf16 and fp16), from
DeepSpeed's own files and from a checkpoint that holds the sharded state alone."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import read_metrics, run_train, start_train, tiny_corpus_overrides

STEPS, KILL_AFTER = 20, 10
# name -> (ranks, overrides)
LAYOUTS = {
    "single": (0, []),
    "pp2": (2, ["parallel=pp2"]),
    "tp2-pp2": (4, ["parallel=tp2-pp2", "model.n_layer=4"]),
    "zero3-fp16": (2, ["parallel=zero3", "parallel.precision=fp16"]),  # the loss scaler's state carried
    "pp2-bf16": (2, ["parallel=pp2", "parallel.precision=bf16"]),
    "tp2-dp2-zero3-sp": (4, ["parallel=zero3", "parallel.tp=2", "parallel.sequence_parallel=true"]),
}
# DeepSpeed's BF16_Optimizer (bf16 under a pipeline without ZeRO) cannot read its own files back: the sharded
# state resumes it even where they are there (consolidate.deepspeed_resumes)
SHARDED_ALWAYS = {"pp2-bf16"}
DEEPSPEED_FILES = "*_states.pt"  # DeepSpeed's model and optimizer files (mp_rank_*, zero_pp_rank_*, layer_*)


def losses(run_dir) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a kill, then after the resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def latest_tag(run_dir) -> str:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else ""


def kill_after_checkpoint(run_dir, overrides: list[str], ranks: int, tag: str, timeout: float = 240) -> None:
    """Start a run and SIGKILL the launcher and every rank once ``tag`` is published."""
    proc = start_train(run_dir, overrides, ranks)
    deadline = time.monotonic() + timeout
    try:
        while latest_tag(run_dir) != tag:
            assert proc.poll() is None, f"the run ended before {tag} was saved"
            assert time.monotonic() < deadline, f"{tag} not saved within {timeout} s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_killed_run_resumes_exactly(layout, tmp_path, data_cache):
    ranks, extra = LAYOUTS[layout]
    common = ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", *extra]
    straight, killed, again = tmp_path / "straight", tmp_path / "killed", tmp_path / "again"
    # The uninterrupted run saves the sharded state alone at the kill step (saving changes nothing it trains).
    sharded_only = [f"train.save_interval={KILL_AFTER}", "train.deepspeed_files=false"]
    proc = run_train(straight, [*common, *sharded_only], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = losses(straight)

    kill_after_checkpoint(killed, [*common, f"train.save_interval={KILL_AFTER}"], ranks, f"step_{KILL_AFTER}")
    resume = [*common, f"train.save_interval={KILL_AFTER}", "train.resume=auto"]
    how = "same layout, exact" + (", from the sharded state" if layout in SHARDED_ALWAYS else "")
    continues_exactly(killed, resume, ranks, how, before)

    step_dir = straight / "checkpoints" / f"step_{KILL_AFTER}"
    assert not list(step_dir.glob(DEEPSPEED_FILES)) and list(killed.glob(f"checkpoints/*/{DEEPSPEED_FILES}"))
    resume = [*common, f"train.resume={step_dir}", "train.save_interval=-1"]
    continues_exactly(again, resume, ranks, "same layout, exact, from the sharded state", before)


def continues_exactly(run_dir, overrides: list[str], ranks: int, how: str, before: dict[int, float]) -> None:
    proc = run_train(run_dir, overrides, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {KILL_AFTER} ({how})" in proc.stdout, proc.stdout[-2000:]
    after = losses(run_dir)
    for step in range(KILL_AFTER + 1, STEPS + 1):
        assert after[step] == before[step], (step, before, after)  # bitwise
