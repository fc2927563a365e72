"""The collectives of one GPT forward+backward at tp=2, counted against the analytic formula.

Per transformer layer (b·s·h elements each; Korthikanti et al. 2022, section 4.2):
  without SP: forward  2 all-reduce       (attention proj, MLP fc2: reduce_from_tp)
              backward 2 all-reduce       (QKV, fc1: copy_to_tp)
  with SP:    forward  2 all-gather + 2 reduce-scatter (column inputs, row outputs)
              backward 2 all-gather + 2 reduce-scatter (their adjoints)
Outside the layers:
  embedding       forward 1 all-reduce (b·s·h)
  to/from block   with SP: forward 1 all-gather (from_block_layout), backward 1 all-gather
                  (to_block_layout's adjoint), each b·s·h
  output head     backward 1 all-reduce (b·s·h, copy_to_tp)
  loss            forward 3 all-reduce of b·s (max, target logit, sum of exponentials)
  SP grads        1 all-reduce of the LayerNorm and row-bias gradients, (6·l + 2)·h
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.model import GPT, ModelShape
from trainer.parallel.layers import (
    TensorParallelLayers,
    allreduce_sequence_parallel_grads,
    register_sequence_parallel_grad_hooks,
)
from trainer.parallel.mappings import CommStats

from .spawn import run_ranks

pytestmark = pytest.mark.multiproc

SHAPE = ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=16, vocab_size=128)
BATCH = 2


def expected_counts(l: int, b: int, s: int, h: int, sequence_parallel: bool) -> dict[str, dict]:
    """{phase: {kind: (count, elements)}} for the phases forward, backward and sp_grads."""
    bsh, bs = b * s * h, b * s
    if not sequence_parallel:
        return {
            # 2 per layer + embedding, then the loss's 3
            "forward": {"all_reduce": (2 * l + 1 + 3, (2 * l + 1) * bsh + 3 * bs)},
            # 2 per layer + output head
            "backward": {"all_reduce": (2 * l + 1, (2 * l + 1) * bsh)},
            "sp_grads": {},
        }
    return {
        "forward": {
            "all_reduce": (1 + 3, bsh + 3 * bs),  # embedding, loss
            "all_gather": (2 * l + 1, (2 * l + 1) * bsh),  # 2 per layer + from_block_layout
            "reduce_scatter": (2 * l, 2 * l * bsh),  # 2 per layer
        },
        "backward": {
            "all_reduce": (1, bsh),  # output head
            "all_gather": (2 * l + 1, (2 * l + 1) * bsh),  # 2 per layer + to_block_layout
            "reduce_scatter": (2 * l, 2 * l * bsh),  # 2 per layer
        },
        # ln_1, ln_2 (2h each) and 2 row biases (h each) per layer, ln_f (2h): one flat buffer
        "sp_grads": {"all_reduce": (1, (6 * l + 2) * h)},
    }


def _delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for kind, rec in after.items():
        prev = before.get(kind)
        count = rec.count - (prev.count if prev else 0)
        elements = rec.elements - (prev.elements if prev else 0)
        if count:
            out[kind] = (count, elements)
    return out


def _check_counts(rank: int, world: int) -> None:
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.seq_len), generator=gen)
    targets = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.seq_len), generator=gen)
    for sequence_parallel in (False, True):
        stats = CommStats()
        model = GPT(SHAPE, TensorParallelLayers(group, stats, sequence_parallel), seed=0)
        assert stats.kinds() == [], "initialisation must not communicate"
        phases = {}
        start = stats.snapshot()
        loss = model(idx, targets)
        after_forward = stats.snapshot()
        loss.backward()
        after_backward = stats.snapshot()
        if sequence_parallel:
            allreduce_sequence_parallel_grads(model, group, stats)
        phases["forward"] = _delta(start, after_forward)
        phases["backward"] = _delta(after_forward, after_backward)
        phases["sp_grads"] = _delta(after_backward, stats.snapshot())

        want = expected_counts(SHAPE.n_layer, BATCH, SHAPE.seq_len, SHAPE.n_embd, sequence_parallel)
        assert phases == want, f"sp={sequence_parallel}: counted {phases}, expected {want}"
        for kind in stats.kinds():
            assert stats[kind].bytes == 4 * stats[kind].elements  # fp32


def test_gpt_collectives_at_tp2():
    run_ranks(_check_counts, 2)


def _check_recompute(rank: int, world: int) -> None:
    """Full recompute runs the blocks' forward again in the backward, collectives included, except the last
    of each run (torch's non-reentrant checkpoint stops once the saved tensors are back): the micro-batch's
    count and bytes per kind are what ``formulas.tp_collectives`` says, for runs of 1 and of 2 blocks."""
    from trainer.analysis.formulas import recompute_stops_early, recomputed_runs, tp_collectives

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.seq_len), generator=gen)
    l, h, s = SHAPE.n_layer, SHAPE.n_embd, SHAPE.seq_len
    for sequence_parallel, every in ((False, 1), (True, 1), (False, 2), (True, 2)):
        stats = CommStats()
        model = GPT(SHAPE, TensorParallelLayers(dist.group.WORLD, stats, sequence_parallel), 0, "full", every)
        if sequence_parallel:  # as the trainer does: one all-reduce per replicated parameter and backward
            register_sequence_parallel_grad_hooks(model, dist.group.WORLD, stats)
        model(idx, idx).backward()
        counted = {kind: (stats[kind].count, float(stats[kind].bytes)) for kind in stats.kinds()}
        runs = recomputed_runs(range(l + 3), l, every, pipelined=False)
        want = tp_collectives(
            l, BATCH, s, h, world, sequence_parallel, 4, None, (6, 2), runs, recompute_stops_early(False)
        )
        assert counted == want, f"sp={sequence_parallel} every={every}: counted {counted}, formula {want}"
        assert want != tp_collectives(l, BATCH, s, h, world, sequence_parallel)  # the recompute is counted


def test_full_recompute_repeats_the_forward_collectives():
    run_ranks(_check_recompute, 2)
