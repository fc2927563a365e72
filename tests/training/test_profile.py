"""train.profile_*: torch.profiler over chosen steps of chosen ranks, written into the run directory."""

from __future__ import annotations

import json

import torch

from conftest import read_metrics, run_train, tiny_corpus_overrides
from trainer.training.profiler import StepProfiler, device_busy


def test_profiled_steps_leave_a_trace_and_a_table(tmp_path, data_cache):
    run = tmp_path / "run"
    overrides = ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=4", "train.save_interval=-1"]
    proc = run_train(run, [*overrides, "train.profile_start=2", "train.profile_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"profile of steps 2-3 (rank 0): {run / 'profile' / 'rank0.json'}" in proc.stdout
    events = json.loads((run / "profile" / "rank0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names and "Optimizer.step#AdamW.step" in names  # the model's matmuls and the update
    steps = sum(e.get("name") == "Optimizer.step#AdamW.step" for e in events)
    assert steps == 2, steps  # exactly the two profiled steps
    table = (run / "profile" / "rank0.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 4  # the run went on to the end


def test_only_the_chosen_ranks_profile(tmp_path):
    idle = StepProfiler(2, 2, [1], 0, torch.device("cpu"), tmp_path)
    idle.step_begins(2)
    assert idle.step_ends(3) is None and not (tmp_path / "profile").exists()
    off = StepProfiler.off()
    off.step_begins(1)
    assert off.step_ends(1) is None


def test_device_busy_counts_overlapping_kernels_once():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "step", "ts": 0, "dur": 10_000},  # the window: 10 ms
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 1_000, "dur": 2_000},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 2_000, "dur": 2_000},  # overlaps a by 1 ms (two streams)
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 6_000, "dur": 1_000},
        {"ph": "X", "cat": "kernel", "name": "d", "ts": 6_500, "dur": 100},  # inside c
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 9_000},  # no duration: not work
    ]
    assert device_busy(events) == (4.0, 10.0)
    assert device_busy(events[:1]) is None  # a CPU trace
