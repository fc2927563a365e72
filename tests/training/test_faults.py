"""A rank that dies mid-run stops the whole job (no hang, non-zero exit), and ``train.resume=auto``
then finishes the run with the same final loss as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from conftest import read_metrics, run_train, start_train, tiny_corpus_overrides

STEPS, SAVE_EVERY = 12, 4
TIMEOUT_S = 20  # train.collective_timeout_s for these runs
LAYOUTS = {2: ["parallel=dp"], 4: ["parallel=tp2-pp2", "model.n_layer=4"]}


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of every training process the launcher started."""
    ranks = {}
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = proc.environ()
            cmdline = " ".join(proc.cmdline())
            if "trainer.train" in cmdline and "deepspeed.launcher" not in cmdline and "RANK" in env:
                ranks[int(env["RANK"])] = proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def _wait_for_step(run_dir, step: int, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and any(r.get("step") == step and "loss" in r for r in read_metrics(run_dir))):
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.1)


def _final_loss(run_dir) -> float:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r and r["step"] == STEPS][-1]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", list(LAYOUTS))
def test_killed_rank_stops_the_job_and_resume_finishes_it(ranks, tmp_path, data_cache):
    common = [
        "debug=smoke",
        *tiny_corpus_overrides(data_cache),
        *LAYOUTS[ranks],
        f"train.steps={STEPS}",
        f"train.save_interval={SAVE_EVERY}",
        f"train.collective_timeout_s={TIMEOUT_S}",
    ]
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    proc = run_train(straight, common, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]

    job = start_train(faulty, common, ranks=ranks)
    try:
        _wait_for_step(faulty, SAVE_EVERY + 2, job)
        victims = _rank_pids(job.pid)
        assert sorted(victims) == list(range(ranks)), victims
        killed_at = time.monotonic()
        os.kill(victims[ranks - 1], signal.SIGKILL)
        job.wait(timeout=TIMEOUT_S + 30)
        stopped_after = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert not [pid for pid in victims.values() if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    print(f"world {ranks}: every process gone {stopped_after:.1f} s after the kill, launcher exit {job.returncode}")

    proc = run_train(faulty, [*common, "train.resume=auto"], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(same layout, exact)" in proc.stdout
    assert _final_loss(faulty) == _final_loss(straight)  # bitwise: the resumed run retraces the same steps
