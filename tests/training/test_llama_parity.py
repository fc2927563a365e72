"""A Llama-style model (RMSNorm, SwiGLU, rotary positions, grouped-query attention with 4 query and 2
key/value heads, no biases, untied head) trains like one process at every kind of layout: the first 10
losses equal the single-process run within 1e-5 relative (fp32), and a checkpoint saved at tp2·pp2
continues at other layouts as the source run does.

The reference is one process with the global batch of 8 as 2 accumulated micro-batches of 4; each
layout splits the same 8 samples per step (as in test_layout_parity, with the GPT).
"""

from __future__ import annotations

import pytest

from conftest import LAYOUTS, PARITY_RTOL, read_metrics, run_train, tiny_corpus_overrides

STEPS = 10
SAVE_AT = 5
MODEL = ["model=llama-tiny", "debug=smoke", "model.n_layer=4", "model.n_embd=64", "model.seq_len=32"]
BATCH = ["parallel.micro_batch=4", "parallel.global_batch=8"]
PARITY = ["tp2", "tp2-sp", "pp2", "zero3-dp2", "tp2-pp2", "tp2-dp2-zero3"]
RESHARDS = ["single", "zero3-dp2", "tp2-sp"]  # targets of the tp2-pp2 checkpoint


def _overrides(data_cache, *extra: str) -> list[str]:
    return [*MODEL, *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", *extra, *BATCH]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _train(run_dir, layout: str, data_cache, *extra: str):
    ranks, overrides = LAYOUTS[layout]
    proc = run_train(run_dir, _overrides(data_cache, *overrides, *extra), ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _deviation(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want)
    return max(abs(got[step] - want[step]) / abs(want[step]) for step in want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("single")
    proc = _train(run_dir, "single", data_cache)
    assert "llama-tiny" in proc.stdout
    return _losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("layout", PARITY)
def test_llama_layout_matches_single_process(layout, tmp_path, data_cache, reference):
    run_dir = tmp_path / layout
    _train(run_dir, layout, data_cache)
    losses = _losses(run_dir)
    deviation = _deviation(losses, reference)
    print(f"\n| llama-tiny {layout} | {losses[STEPS]:.6f} | {deviation:.2e} |")
    assert len(losses) == STEPS
    assert deviation < PARITY_RTOL, (losses, reference)
    assert losses[STEPS] < losses[1]  # and it learns


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_cache):
    """A tp2·pp2 run that checkpoints at step SAVE_AT and goes on to STEPS."""
    run_dir = tmp_path_factory.mktemp("tp2-pp2") / "run"
    _train(run_dir, "tp2-pp2", data_cache, f"train.save_interval={SAVE_AT}")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("target", RESHARDS)
def test_llama_checkpoint_reshards(target, source, tmp_path, data_cache):
    step_dir = source / "checkpoints" / f"step_{SAVE_AT}"
    proc = _train(tmp_path / "run", target, data_cache, f"train.resume={step_dir}")
    assert f"at step {SAVE_AT} (resharded from" in proc.stdout and "Adam moments resharded" in proc.stdout
    want = {step: loss for step, loss in _losses(source).items() if step > SAVE_AT}
    deviation = _deviation(_losses(tmp_path / "run"), want)
    print(f"\n| llama-tiny tp2-pp2 -> {target} | {deviation:.2e} |")
    assert deviation < PARITY_RTOL
