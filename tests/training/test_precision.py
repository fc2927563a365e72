"""Mixed precision as users run it, on CPU: bf16 (fp32 master weights) and fp16 (fp32 masters, dynamic loss
scaling) train like fp32 at every kind of layout, an fp16 overflow is skipped and halves the loss scale, and
checkpoints carry the fp32 masters, Adam's moments and the scale across a resume.

The fp32 reference is one process: every layout's fp32 losses equal it within 1e-5 (test_layout_parity), so
each precision's deviation here is the precision's own.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import LAYOUTS, read_metrics, run_train, tiny_corpus_overrides
from trainer.checkpoint.sharded import read_tensors

STEPS = 50
# Relative deviation of a bf16/fp16 run's loss from fp32's, allowed at every step. Measured on this model
# (gpt-tiny at debug=smoke sizes, 50 steps): at most 0.0091% (bf16) and 0.0034% (fp16) at any layout.
MIXED_RTOL = 0.02
# The same for the logged gradient norm (before clipping; fp16's loss scale divided out). Measured: at most 0.14%
# (bf16) and 0.041% (fp16); DeepSpeed's fp16 wrapper at ZeRO-0 would log it 2^16 times too large.
NORM_RTOL = 0.01
INITIAL_SCALE = 2.0**16  # trainer.runtime.ds_config: fp16.initial_scale_power = 16


def _overrides(data_cache, *extra: str) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", "train.save_interval=-1", *extra]


def _steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def fp32_records(tmp_path_factory, data_cache) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("fp32")
    proc = run_train(run_dir, _overrides(data_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(_steps(run_dir).values())


CASES = [
    pytest.param(layout, precision, marks=[pytest.mark.slow] if layout != "single" else [])
    for layout in ("single", "tp2", "pp2", "zero2-dp2")
    for precision in ("bf16", "fp16")
]


@pytest.mark.parametrize(("layout", "precision"), CASES)
def test_mixed_precision_follows_fp32(layout, precision, tmp_path, data_cache, fp32_records):
    ranks, extra = LAYOUTS[layout]
    run_dir = tmp_path / f"{layout}-{precision}"
    proc = run_train(run_dir, _overrides(data_cache, f"parallel.precision={precision}", *extra), ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(_steps(run_dir).values())
    losses, fp32_losses = [r["loss"] for r in records], [r["loss"] for r in fp32_records]
    assert len(losses) == len(fp32_losses) == STEPS
    deviation = max(abs(a - b) / b for a, b in zip(losses, fp32_losses))
    print(f"\n| {layout} | {precision} | {losses[-1]:.6f} | {deviation:.2e} |")
    assert deviation < MIXED_RTOL, (losses, fp32_losses)
    assert losses[-1] < losses[0] - 0.4  # it learns as fp32 does (6.24 -> 5.67)
    assert all(r["skipped_steps"] == 0 for r in records)  # no overflow on the way
    scales = {r["loss_scale"] for r in records}
    assert scales == ({INITIAL_SCALE} if precision == "fp16" else {None})
    norms = [(r["grad_norm"], f["grad_norm"]) for r, f in zip(records, fp32_records) if f["grad_norm"] is not None]
    assert norms and all(got is not None for got, _ in norms)
    norm_deviation = max(abs(got - want) / want for got, want in norms)
    print(f"grad_norm deviation {norm_deviation:.2e}")
    assert norm_deviation < NORM_RTOL, norms


def test_fp16_overflow_is_skipped_and_halves_the_loss_scale(tmp_path, data_cache):
    """An injected NaN in fp16: no update (fp32 masters and Adam's moments as before), counted as skipped,
    the schedule held, the scale halved; a same-layout resume carries the scale (bit-for-bit losses)."""
    run_dir = tmp_path / "run"
    common = ["parallel.precision=fp16", "train.steps=5", "train.inject_nan_steps=[3]"]
    proc = run_train(run_dir, [*_overrides(data_cache, *common), "train.save_interval=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _steps(run_dir)
    assert math.isnan(got[3]["loss"]) and math.isfinite(got[4]["loss"])
    assert [got[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert [got[s]["loss_scale"] for s in range(1, 6)] == [INITIAL_SCALE] * 2 + [INITIAL_SCALE / 2] * 3
    assert got[4]["lr"] == got[3]["lr"]  # the schedule did not move
    before, after = run_dir / "checkpoints" / "step_2", run_dir / "checkpoints" / "step_3"
    for kind in ("model", "exp_avg", "exp_avg_sq"):
        saved, skipped = read_tensors(before, kind), read_tensors(after, kind)
        assert saved.keys() == skipped.keys() and saved
        assert all(torch.equal(saved[name], skipped[name]) for name in saved), kind
    # The fp32 masters were saved, not the fp16 weights: a master moved by less than an fp16 step.
    wte = read_tensors(run_dir / "checkpoints" / "step_5")["wte.weight"]
    assert not torch.equal(wte, wte.half().float())

    resumed = tmp_path / "resumed"
    proc = run_train(resumed, [*_overrides(data_cache, *common), f"train.resume={before}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _steps(resumed)
    assert [again[s]["loss_scale"] for s in (3, 4, 5)] == [INITIAL_SCALE / 2] * 3
    assert [again[s]["loss"] for s in (4, 5)] == [got[s]["loss"] for s in (4, 5)]


@pytest.mark.slow
def test_bf16_checkpoint_reshards_masters_and_moments(tmp_path, data_cache):
    """A bf16 pp2 checkpoint (DeepSpeed's BF16_Optimizer) resumed at one process (its ZeRO-0 bf16 optimizer)
    continues from the saved fp32 masters with Adam's moments, as the pp2 run itself goes on."""
    pp2, single = tmp_path / "pp2", tmp_path / "single"
    common = ["parallel.precision=bf16", "train.steps=8"]
    ranks, extra = LAYOUTS["pp2"]
    proc = run_train(pp2, [*_overrides(data_cache, *common, *extra), "train.save_interval=4"], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_4 = pp2 / "checkpoints" / "step_4"
    assert read_tensors(step_4, "exp_avg")  # the moments were saved
    proc = run_train(single, [*_overrides(data_cache, *common), f"train.resume={step_4}", "train.save_interval=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights and Adam moments resharded" in proc.stdout
    want, got = _steps(pp2), _steps(single)
    assert all(abs(got[s]["loss"] - want[s]["loss"]) / want[s]["loss"] < 1e-3 for s in range(5, 9)), (got, want)
    # Four steps on, weights and moments are still the pp2 run's to within a small part of what four updates
    # moved them (measured 0.11% of the weights' movement, 0.26% / 0.23% of the moments): weights resumed from
    # the 16-bit copies or moments restarted from zero would be off by a large part of it.
    start = read_tensors(step_4)
    for kind in ("model", "exp_avg", "exp_avg_sq"):
        ours, theirs = (read_tensors(run / "checkpoints" / "step_8", kind) for run in (single, pp2))
        off = sum((ours[name] - theirs[name]).abs().sum() for name in theirs)
        moved = sum((theirs[name] - (start[name] if kind == "model" else 0)).abs().sum() for name in theirs)
        assert off < 0.01 * moved, kind


# --- speed.flat_optimizer: ZeRO-1's flat optimizer for mixed precision at one data-parallel rank --------------


def _flat_run(run_dir, data_cache, precision: str, flat: str, *extra: str) -> dict[int, dict]:
    common = [f"parallel.precision={precision}", f"speed.flat_optimizer={flat}", "train.steps=8", *extra]
    proc = run_train(run_dir, _overrides(data_cache, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("flat optimizer (ZeRO-1 at dp 1)" in proc.stdout) == (flat == "true"), proc.stdout[-2000:]
    return _steps(run_dir)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_flat_optimizer_trains_as_the_per_tensor_one(precision, tmp_path, data_cache):
    """speed.flat_optimizer on (DeepSpeed's ZeRO-1 optimizer over one rank) vs off (its per-tensor ZeRO-0
    wrapper): the same losses within the precision's rounding of a summed norm (1e-4 measured well below),
    checkpoints either can resume (the on run's step 4 resumed with it off continues its losses), and the
    saved masters are fp32."""
    on = _flat_run(tmp_path / "on", data_cache, precision, "true", "train.save_interval=4")
    off = _flat_run(tmp_path / "off", data_cache, precision, "false")
    assert all(math.isclose(on[s]["loss"], off[s]["loss"], rel_tol=1e-4) for s in range(1, 9)), (on, off)
    assert {r["loss_scale"] for r in on.values()} == ({INITIAL_SCALE} if precision == "fp16" else {None})
    step_4 = tmp_path / "on" / "checkpoints" / "step_4"
    assert read_tensors(step_4, "exp_avg")  # Adam's moments are in the checkpoint
    wte = read_tensors(step_4)["wte.weight"]
    assert wte.dtype == torch.float32 and not torch.equal(
        wte, wte.to(getattr(torch, {"bf16": "bfloat16"}.get(precision, "float16"))).float()
    )
    resumed = _flat_run(tmp_path / "resumed", data_cache, precision, "false", f"train.resume={step_4}")
    assert all(math.isclose(resumed[s]["loss"], on[s]["loss"], rel_tol=1e-4) for s in range(5, 9)), (resumed, on)


@pytest.mark.slow
def test_flat_optimizer_at_tp2_trains_as_the_per_tensor_one(tmp_path, data_cache):
    """tp 2 x dp 1 (what auto picks on two GPUs with parallel=tp2): ZeRO-1's norm over tp shards is the wrapper's."""
    ranks, extra = LAYOUTS["tp2"]
    runs = {}
    for flat in ("true", "false"):
        overrides = _overrides(data_cache, "parallel.precision=bf16", f"speed.flat_optimizer={flat}", "train.steps=8")
        proc = run_train(tmp_path / flat, [*overrides, *extra], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flat] = _steps(tmp_path / flat)
    on, off = runs["true"], runs["false"]
    assert all(math.isclose(on[s]["loss"], off[s]["loss"], rel_tol=1e-4) for s in range(1, 9)), (on, off)
    assert all(math.isclose(on[s]["grad_norm"], off[s]["grad_norm"], rel_tol=1e-3) for s in range(1, 9)), (on, off)


def test_flat_optimizer_skips_an_fp16_overflow(tmp_path, data_cache):
    """With the flat optimizer an injected NaN is skipped and halves the scale, as with the per-tensor one."""
    got = _flat_run(tmp_path / "run", data_cache, "fp16", "true", "train.inject_nan_steps=[3]")
    assert [got[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert [got[s]["loss_scale"] for s in range(1, 6)] == [INITIAL_SCALE] * 2 + [INITIAL_SCALE / 2] * 3
    assert math.isnan(got[3]["loss"]) and math.isfinite(got[4]["loss"])
