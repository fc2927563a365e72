"""The planner's stage cuts (``ModelShape.stage_bounds``) are DeepSpeed's: for the trainer's own layer specs
(``trainer.parallel.pipeline.layer_specs``), DeepSpeed's ``PipelineModule._count_layer_params`` and
``_partition_layers`` give the same boundaries, for even and uneven stages, tied and untied heads, tp 1 and 2.

``_partition_layers`` runs on a stand-in for the module (it reads the specs, the stage count and the rank's
pipeline coordinate, and records ``parts``), so no process group is needed at tp 1; tp 2 builds the
tensor-parallel layers on 2 gloo ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.utils import partition_balanced as ds_partition_balanced

from trainer.model import DenseLayers, ModelShape
from trainer.model.shape import partition_balanced
from trainer.parallel.pipeline import layer_specs

from .spawn import run_ranks

GPT = ModelShape(n_layer=6, n_embd=64, n_head=4, seq_len=16, vocab_size=1000, name="gpt")
GPT_SMALL_VOCAB = ModelShape(n_layer=7, n_embd=64, n_head=4, seq_len=16, vocab_size=96, name="gpt-v96")
LLAMA = ModelShape(
    n_layer=5, n_embd=64, n_head=4, seq_len=16, vocab_size=512, n_kv_head=2, mlp="swiglu", norm="rmsnorm",
    position="rope", bias=False, tie_embeddings=False, name="llama",
)  # fmt: skip
SHAPES = (GPT, GPT_SMALL_VOCAB, LLAMA)


def deepspeed_parts(specs, pp: int, method: str) -> tuple[list[int], list[int]]:
    """(per-layer parameter counts, stage boundaries) as DeepSpeed's PipelineModule computes them."""
    counts = PipelineModule._count_layer_params(SimpleNamespace(_layer_specs=specs))
    module = SimpleNamespace(
        num_stages=pp,
        global_rank=1,  # not 0: rank 0 prints the partition
        _topo=SimpleNamespace(get_coord=lambda rank: SimpleNamespace(pipe=0)),
        _layer_specs=specs,
        _count_layer_params=lambda: counts,
        _set_bounds=lambda start, stop: None,
    )
    PipelineModule._partition_layers(module, method)
    return counts, [int(b) for b in module.parts]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_stage_bounds_are_deepspeeds_at_tp1(shape):
    specs = layer_specs(shape, DenseLayers())
    for pp in range(1, shape.n_layer + 1):
        for method in ("parameters", "uniform"):
            counts, parts = deepspeed_parts(specs, pp, method)
            assert counts == shape.layer_params(1)
            assert shape.stage_bounds(1, pp, method) == parts, (pp, method)


def test_some_cuts_are_uneven():
    """What the planner used to refuse: 6 blocks over 4 stages, and the parameter balance moving blocks off the
    stages that hold the embedding and the head."""
    blocks = [sum(1 for p in where if 1 <= p <= 6) for where in GPT.stages(1, 4, "parameters")]
    assert sum(blocks) == 6 and len(set(blocks)) > 1, blocks
    assert GPT.stage_bounds(1, 3, "even") == [0, 3, 5, 9]
    with pytest.raises(ValueError):
        GPT.stage_bounds(1, 4, "even")


def test_the_vectorised_partition_is_deepspeeds():
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 30), rng.randint(1, 32)
        weights = [rng.choice([rng.randint(0, 4), rng.randint(0, 10**7), rng.random()]) for _ in range(n)]
        assert partition_balanced(weights, m) == list(ds_partition_balanced(weights, m)), (weights, m)


def _check_tp2(rank: int, world_size: int) -> None:
    from trainer.parallel.layers import TensorParallelLayers

    layers = TensorParallelLayers(dist.group.WORLD)
    for shape in SHAPES:
        padded = shape.padded(2)
        specs = layer_specs(padded, layers)
        for pp in range(1, shape.n_layer + 1):
            counts, parts = deepspeed_parts(specs, pp, "parameters")
            assert counts == padded.layer_params(2), shape.name
            assert padded.stage_bounds(2, pp, "parameters") == parts, (shape.name, pp)


def test_stage_bounds_are_deepspeeds_at_tp2():
    run_ranks(_check_tp2, 2)
