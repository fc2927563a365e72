"""DeepSpeed's bf16 pipeline without ZeRO (its BF16_Optimizer) as the planner predicts it: the fp32 masters and
Adam's moments in data-parallel partitions, a second, flat copy of the gradients, and an all-gather of the updated
weights after the gradients' all-reduce (``stages.shards_optimizer``). Checked against what the trainer's own
per-rank records measure at pp 2 x dp 2."""

from __future__ import annotations

import pytest

from conftest import compose_config, read_metrics, run_train, tiny_corpus_overrides
from trainer.analysis.planner.layouts import Layout
from trainer.analysis.planner.memory import Collectives, stage_memory
from trainer.analysis.planner.stages import pipeline_stages, shards_optimizer
from trainer.model.shape import ModelShape

pytestmark = pytest.mark.slow
COMMON = ["debug=smoke", "parallel=pp2", "parallel.precision=bf16", "train.steps=3", "train.save_interval=-1"]


def test_the_engines_shard_rules():
    assert shards_optimizer("deepspeed", "bf16", 2, 0)  # BF16_Optimizer
    assert not shards_optimizer("deepspeed", "fp16", 2, 0)  # FP16_Optimizer keeps whole masters
    assert not shards_optimizer("deepspeed", "bf16", 1, 0)  # no pipeline: the per-tensor wrapper
    assert not shards_optimizer("megatron", "bf16", 2, 0)
    assert shards_optimizer("megatron", "fp32", 1, 1)


def test_the_bf16_pipeline_also_gathers_the_weights():
    """Its step time's data-parallel part: the all-reduce, plus the all-gather fp16 (whole masters) does not pay."""
    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.costmodel import dp_step_time, ring_time
    from trainer.analysis.planner.run import compose_plan

    spec = cluster_spec(compose_plan(["cluster=a100-80gb", "cluster.nodes=2"]).cluster)
    layout, psi = Layout(1, 2, 8, 0, 1, "none", False), 1e9
    gather = ring_time(psi * 2, 8, "all_gather", spec.dp_link(1, 8))
    bf16, fp16 = (dp_step_time(layout, psi, precision, spec, 2) for precision in ("bf16", "fp16"))
    assert bf16 == pytest.approx(fp16 + gather, rel=1e-12) and gather > 0


def test_planned_states_are_the_measured_ones(tmp_path, data_cache):
    overrides = [*COMMON, *tiny_corpus_overrides(data_cache)]
    proc = run_train(tmp_path / "run", overrides, ranks=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = [r for r in read_metrics(tmp_path / "run") if "ranks" in r][-1]
    cfg, _ = compose_config(overrides)
    shape, p = ModelShape.from_config(cfg.model), cfg.parallel
    layout = Layout(1, 2, 2, 0, p.micro_batch, "none", False)
    stages = {(st.positions.start, st.positions.stop): st for st in pipeline_stages(shape, 1, 2, "parameters")}
    for rank in record["ranks"]:
        stage = stages[tuple(rank["positions"])]
        mine = stage_memory(shape, layout, p.global_batch, "bf16", 0.0, 0.0, Collectives(), False, "deepspeed", stage)
        mem = rank["mem"]
        assert mem["params"] == pytest.approx(mine.weights, rel=1e-3)
        assert mem["grads"] == pytest.approx(mine.grads, rel=1e-3)  # 2 + 2 bytes: the bf16 grads and the flat copy
        assert mem["master"] + mem["optimizer"] == pytest.approx(mine.optimizer, rel=1e-3)  # 12 bytes / dp
    # the gradients' all-reduce, then the updated weights' all-gather (the tied embedding's reduction is a third)
    kinds = {name.split("@")[0] for name in record["ds_comm"]}
    assert {"all_reduce", "all_gather"} <= kinds
