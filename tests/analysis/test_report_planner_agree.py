"""The comparison report and the planner predict from one analytic core: for every layout the comparison
runs at world 4, both give the same parameters per rank and the same model-state bytes (fp32)."""

from __future__ import annotations

import pytest

from trainer.analysis.compare.results import predict_rank
from trainer.analysis.compare.runner import Settings, auto_layouts, check, parse_layout
from trainer.analysis.planner.layouts import Layout
from trainer.analysis.planner.memory import memory_per_gpu
from trainer.config.cli import register
from trainer.model.shape import ModelShape

WORLD = 4
MICRO, GLOBAL = 2, 16


def _settings(tmp_path) -> Settings:
    return Settings(WORLD, 0, 1, MICRO, GLOBAL, 1, 60, "disabled", tmp_path, ("model=gpt-tiny", "data=pystdlib"))


def _stage_positions(n_layer: int, pp: int, stage: int) -> range:
    """An even split, as the planner assumes: stage 0 also holds the embedding, the last the norm and head."""
    per = n_layer // pp
    lo = 0 if stage == 0 else 1 + stage * per
    hi = 1 + (stage + 1) * per if stage < pp - 1 else n_layer + 3
    return range(lo, hi)


@pytest.mark.parametrize("name", [n for n in auto_layouts(WORLD) if n != "baseline"])
def test_report_and_planner_predict_the_same_model_states(name, tmp_path):
    register()
    outcome = check(parse_layout(name, WORLD), _settings(tmp_path))
    assert outcome.status == "pending", outcome.reason  # every auto layout is valid at world 4
    lay, cfg = outcome.layout, outcome.cfg
    shape = ModelShape.from_config(cfg.model)
    planned = Layout(lay.tp, lay.pp, lay.dp, lay.zero, MICRO, "none", lay.sp)
    for stage in range(lay.pp):
        where = _stage_positions(shape.n_layer, lay.pp, stage)
        report = predict_rank(outcome, [where.start, where.stop], stage, 0)
        planner_psi = shape.stage_params(lay.tp, lay.pp, first=stage == 0, last=stage == lay.pp - 1)
        assert report["psi"] == pytest.approx(planner_psi, rel=1e-12)
    if lay.pp == 1:  # one stage: the planner's memory breakdown is this rank's
        mem = memory_per_gpu(shape, planned, GLOBAL, "fp32", reserved=0.0, fragmentation=0.0)
        report = predict_rank(outcome, [0, shape.n_layer + 3], 0, 0)
        assert mem.weights == pytest.approx(report["params"], rel=1e-12)
        assert mem.optimizer == pytest.approx(report["master"] + report["optimizer"], rel=1e-12)
        if lay.zero != 2:  # at ZeRO-2 the report also models DeepSpeed's partition boundaries (real param order)
            assert mem.grads == pytest.approx(report["grads"], rel=1e-12)
