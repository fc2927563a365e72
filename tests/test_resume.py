"""A run resumed from a checkpoint continues exactly: same samples, learning rates and losses."""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_train, tiny_corpus_overrides

# name -> (ranks, overrides)
LAYOUTS = {"single": (0, []), "pp2": (2, ["parallel=pp2"]), "tp2-pp2": (4, ["parallel=tp2-pp2", "model.n_layer=4"])}


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_continues_the_same_run(layout, tmp_path, data_cache):
    ranks, extra = LAYOUTS[layout]
    common = ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=6", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_train(straight, [*common, "train.save_interval=3"], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (straight / "checkpoints" / "step_3").is_dir()
    proc = run_train(resumed, [*common, f"train.resume={straight / 'checkpoints' / 'step_3'}"], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    before, after = _losses(straight), _losses(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == before[step], (step, before, after)  # bitwise (fp32, CPU)
