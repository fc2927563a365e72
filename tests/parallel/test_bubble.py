"""The bubble meter on a real 2-stage pipeline, and the analytic bubble. Timings are not pass/fail:
the checks are on structure (every stage reports, instruction counts follow the 1F1B schedule) and
on the invariants idle + compute = step, 0 <= idle fraction < 1."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.analysis.formulas import pipeline_bubble as analytic_bubble
from trainer.analysis.formulas import pipeline_idle_fraction as analytic_idle_fraction

from .spawn import run_ranks, start_deepspeed
from .test_pipeline import MICRO, SEED, SHAPE

M = 4  # micro-batches per step


def _check_meter(rank: int, world: int) -> None:
    deepspeed = start_deepspeed(rank, world)
    from trainer.model import DenseLayers
    from trainer.parallel import ParallelDims, build_mesh
    from trainer.parallel.bubble import BubbleMeter, gather_stages
    from trainer.parallel.pipeline import build_pipeline_module, install_pipeline_clipping, pipeline_config

    dims = ParallelDims(world, pp=world)
    mesh = build_mesh(dims)
    module = build_pipeline_module(SHAPE, DenseLayers(), dims, SEED)
    config = {
        "train_batch_size": MICRO * M,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": M,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "pipeline": pipeline_config(dims, sequence_parallel=False),
    }
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    install_pipeline_clipping(engine)
    tokens = torch.randint(
        0, SHAPE.vocab_size, (M, MICRO, SHAPE.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    batch = [(t[:, :-1], t[:, 1:]) for t in tokens]

    meter = BubbleMeter(engine)
    assert not meter.synchronize  # CPU: nothing to wait for
    for _ in range(2):  # the first step also allocates the pipeline buffers
        with meter.step() as result:
            engine.train_batch(iter(batch))
        rec = result[0]
        assert (rec.stage, rec.stages, rec.micro_batches) == (mesh.coords.pp, world, M)
        for value in (rec.step_s, rec.compute_s, rec.idle_s, rec.idle_fraction, rec.bubble_ratio):
            assert math.isfinite(value), rec
        assert rec.compute_s > 0 and 0 <= rec.idle_fraction < 1, rec
        assert rec.idle_s + rec.compute_s == pytest.approx(rec.step_s)
        assert sum(rec.instructions.values()) <= rec.step_s * (1 + 1e-6), rec
        # The 1F1B schedule of this stage: m forward and m backward passes, one optimizer step,
        # receives from the neighbours (activations on later stages, gradients on earlier ones).
        counts = rec.counts
        assert counts["ForwardPass"] == counts["BackwardPass"] == M and counts["OptimizerStep"] == 1, counts
        first, last = rec.stage == 0, rec.stage == world - 1
        assert counts.get("RecvActivation", 0) == (0 if first else M), counts
        assert counts.get("RecvGrad", 0) == (0 if last else M), counts
        assert counts.get("LoadMicroBatch", 0) == (M if first or last else 0), counts
        stages = gather_stages(rec, engine.grid.get_pipe_parallel_group())
        assert [r.stage for r in stages] == list(range(world))

    # Untimed outside a step; close() restores the class's instruction map.
    engine.train_batch(iter(batch))
    assert dict(meter._counts) == rec.counts
    meter.close()
    assert "_INSTRUCTION_MAP" not in engine.__dict__


@pytest.mark.multiproc
def test_bubble_meter_pp2():
    run_ranks(_check_meter, 2)


def test_analytic_bubble():
    assert analytic_bubble(1, 8) == 0.0
    assert analytic_bubble(2, 4) == pytest.approx(0.25)
    assert analytic_bubble(4, 8) == pytest.approx(3 / 8)
    assert analytic_idle_fraction(2, 4) == pytest.approx(1 / 5)
    assert analytic_idle_fraction(4, 8) == pytest.approx(3 / 11)
    # The two definitions describe the same bubble: b/(1+b) with b = (p-1)/m.
    b = analytic_bubble(4, 8)
    assert analytic_idle_fraction(4, 8) == pytest.approx(b / (1 + b))
    with pytest.raises(ValueError):
        analytic_bubble(0, 4)
    with pytest.raises(ValueError):
        analytic_idle_fraction(2, 0)
