"""A step whose loss or gradients are not finite is skipped (weights, Adam state and the learning-rate
schedule untouched) and counted; too many in a row stop the run cleanly, the last checkpoint intact."""

from __future__ import annotations

import math

import pytest

from conftest import LAYOUTS, read_metrics, run_train, tiny_corpus_overrides
from trainer.checkpoint.manifest import damage

NAMES = ("single", "zero1-dp2", "pp2", "tp2")


def _common(data_cache, *extra: str) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=6", *extra]


def _steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


SLOW = [pytest.param(name, marks=pytest.mark.slow) for name in NAMES if name != "single"]
# bf16 at ZeRO-0: DeepSpeed's wrapper skips through trainer.runtime.compat.foreach_fp16_step, not the guard
BF16 = ["single-bf16", pytest.param("tp2-bf16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", ["single", *SLOW, *BF16])
def test_poisoned_step_is_skipped_and_training_goes_on(layout, tmp_path, data_cache):
    ranks, extra = LAYOUTS[layout.removesuffix("-bf16")]
    extra = [*extra, "parallel.precision=bf16"] if layout.endswith("-bf16") else extra
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    for run_dir, more in ((clean, []), (poisoned, ["train.inject_nan_steps=[3]"])):
        proc = run_train(run_dir, _common(data_cache, *extra, *more), ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _steps(clean), _steps(poisoned)
    assert math.isnan(got[3]["loss"]) and got[3]["skipped_steps"] == 1
    assert [got[s]["skipped_steps"] for s in (1, 2, 4, 5, 6)] == [0, 0, 1, 1, 1]
    # Nothing was applied at step 3, so step 4 sees the weights step 3 saw, at step 3's learning rate.
    assert got[4]["loss"] != want[4]["loss"] and math.isfinite(got[6]["loss"])
    assert got[4]["lr"] == want[3]["lr"]
    assert [got[s]["loss"] for s in (1, 2)] == [want[s]["loss"] for s in (1, 2)]


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    overrides = ["train.save_interval=2", "train.max_skipped_steps=2", "train.inject_nan_steps=[3,4,5]"]
    proc = run_train(run_dir, _common(data_cache, *overrides))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("stopped: step 4: 2 consecutive steps had a non-finite loss or gradient")
    assert "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert damage(run_dir / "checkpoints" / "step_2") is None
    assert max(_steps(run_dir)) == 4
