"""Preemption: SIGTERM or SIGUSR1 to a rank ends the run after the step it is in, with one checkpoint of
that step and exit code 75; ``train.resume=auto`` then continues bitwise like a run never stopped.

The multi-rank run is started as ``launch/slurm.sbatch`` starts it: the launchers ignore SIGUSR1 (Slurm's
``--signal`` reaches every process of the step) and only the ranks act on it. Here one rank alone is
signalled, so the others learn it from the per-step agreement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import ROOT, child_env, read_metrics, run_train, tiny_corpus_overrides, train_command
from trainer.training.preempt import EXIT_PREEMPTED, MARKER, StopSignal

STEPS, SIGNAL_AFTER = 40, 4  # signalled far from the end, whatever the speed
LAYOUTS = {"single": (0, []), "tp2-pp2": (4, ["parallel=tp2-pp2", "model.n_layer=4"])}


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _start(run_dir, overrides: list[str], ranks: int) -> subprocess.Popen:
    def ignore_usr1():  # as slurm.sbatch's node script: launchers ignore it, ranks install their handler
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    return subprocess.Popen(
        train_command(run_dir, overrides, ranks),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=ignore_usr1,
    )


def _ranks(proc: subprocess.Popen, ranks: int) -> list[psutil.Process]:
    if not ranks:
        return [psutil.Process(proc.pid)]
    children = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in children if "trainer.train" in " ".join(p.cmdline()) and "deepspeed" not in p.cmdline()[1]]


def _signal_after(run_dir, proc, ranks: int, sig: int, repeat: int = 1, timeout: float = 300) -> float:
    """Send ``sig`` to one rank once step SIGNAL_AFTER is logged; the seconds until the run has exited."""
    deadline = time.monotonic() + timeout
    while max(_losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}, default=0) < SIGNAL_AFTER:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step to signal"
        time.sleep(0.05)
    target = _ranks(proc, ranks)[-1]
    sent = time.monotonic()
    for _ in range(repeat):  # later signals arrive while the first one's checkpoint is written
        if target.is_running():
            target.send_signal(sig)
        time.sleep(0.03)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - sent


@pytest.mark.slow
# SIGTERM at world 4 (a scheduler's kill), SIGUSR1 at world 1 (Slurm's --signal ahead of the limit); both signals take
# the same path, and SIGTERM at world 1 is the signal of test_second_signal_during_the_save_changes_nothing.
@pytest.mark.parametrize(("layout", "sig"), [("single", signal.SIGUSR1), ("tp2-pp2", signal.SIGTERM)])
def test_signalled_run_saves_exits_75_and_resumes_bitwise(layout, sig, tmp_path, data_cache):
    ranks, extra = LAYOUTS[layout]
    common = ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", *extra]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(straight, common, ranks=ranks).returncode == 0

    proc = _start(stopped, common, ranks)
    elapsed = _signal_after(stopped, proc, ranks, sig)
    out = proc.stdout.read()
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    marker = json.loads((stopped / MARKER).read_text())
    step = marker["step"]
    assert marker == {"step": step, "signal": signal.Signals(sig).name, "saved": True}
    assert SIGNAL_AFTER <= step < STEPS and f"stopped after step {step}, saved step_{step}" in out
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    records = read_metrics(stopped)
    step_s = max(r["step_time_s"] for r in records if "loss" in r)
    save_s = max(max(r["checkpoint_s"]) for r in records if r.get("checkpoint_io") == "save")
    name = signal.Signals(sig).name
    print(f"\n{layout}: {name} -> exit 75 in {elapsed:.1f} s (step {step_s:.2f} s, save {save_s:.2f} s)")

    proc = run_train(stopped, [*common, "train.resume=auto"], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {step} (same layout, exact)" in proc.stdout
    assert not (stopped / MARKER).exists()  # the continued run finished: nothing left to requeue
    before, after = _losses(straight), _losses(stopped)
    for later in range(step + 1, STEPS + 1):
        assert after[later] == before[later], (later, before, after)  # bitwise (fp32, CPU)


@pytest.mark.slow
def test_second_signal_during_the_save_changes_nothing(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    common = ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}"]
    proc = _start(run_dir, common, 0)
    _signal_after(run_dir, proc, 0, signal.SIGTERM, repeat=3)
    assert proc.returncode == EXIT_PREEMPTED
    step = json.loads((run_dir / MARKER).read_text())["step"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    proc = run_train(run_dir, [*common, "train.resume=auto"])
    assert proc.returncode == 0 and f"at step {step} (same layout, exact)" in proc.stdout


def test_stop_signal_keeps_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal().install()
    try:
        assert not stop.agreed(torch_cpu())
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not fatal: the process is still here
        assert stop.name == "SIGUSR1" and stop.agreed(torch_cpu())
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def torch_cpu():
    import torch

    return torch.device("cpu")
