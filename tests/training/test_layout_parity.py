"""Every parallel layout trains like one process: the launcher's per-step losses over the first
steps equal the single-process run with the same global batch, within 1e-5 relative (fp32).

The reference runs one process with the global batch of 8 as 2 accumulated micro-batches of 4;
each layout splits the same 8 samples per step across its data-parallel ranks, and tensor
parallelism splits every layer across its tp ranks.
"""

from __future__ import annotations

import pytest

from conftest import LAYOUTS, PARITY_RTOL, read_metrics, run_train, tiny_corpus_overrides

STEPS = 10
BATCH = ["parallel.micro_batch=4", "parallel.global_batch=8"]
LAYERS = ["model.n_layer=4"]  # enough blocks for 4 pipeline stages

# Every multi-rank layout of the shared table, plus DeepSpeed's uniform partition with checkpointing.
LAYOUTS = {name: spec for name, spec in LAYOUTS.items() if name != "single"}
LAYOUTS["pp2-uniform-ckpt"] = (
    2,
    ["parallel=pp2", "parallel.pipeline_partition=uniform", "parallel.activation_checkpoint_interval=1"],
)


def _overrides(data_cache, *extra: str) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", *LAYERS, *extra, *BATCH]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> list[float]:
    run_dir = tmp_path_factory.mktemp("single")
    proc = run_train(run_dir, _overrides(data_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, tmp_path, data_cache, reference):
    ranks, extra = LAYOUTS[layout]
    run_dir = tmp_path / layout
    proc = run_train(run_dir, _overrides(data_cache, *extra), ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(run_dir)
    assert len(losses) == len(reference) == STEPS
    deviation = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    tokens_per_s = sum(r["tokens_per_s"] for r in read_metrics(run_dir) if "loss" in r) / STEPS
    print(f"\n| {layout} | {ranks} | {losses[-1]:.6f} | {deviation:.2e} | {tokens_per_s:,.0f} |")
    assert deviation < PARITY_RTOL, (losses, reference)
    assert losses[-1] < losses[0]  # and it learns
    assert (run_dir / "checkpoints" / f"step_{STEPS}").is_dir()
    if layout == "tp2":  # per micro-batch: 4 all-reduces per layer, embedding, head, 3 in the loss
        first = next(r for r in read_metrics(run_dir) if "loss" in r)
        assert first["tp_comm"]["all_reduce"]["count"] == 2 * (4 * 4 + 5)  # 2 micro-batches, 4 layers
