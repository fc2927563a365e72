"""The pipeline bubble, measured per stage by timing DeepSpeed's pipeline instructions.

A ``PipelineEngine`` runs one optimizer step (``train_batch``) as a schedule of instructions per
stage (``deepspeed/runtime/pipe/schedule.py``): LoadMicroBatch, ForwardPass, BackwardPass,
Send/RecvActivation, Send/RecvGrad, ReduceTiedGrads, ReduceGrads, OptimizerStep. ``BubbleMeter``
wraps every handler of ``engine._INSTRUCTION_MAP`` with a timer, so for one step of one stage

    step_s     wall time of the step (start_step .. end_step, around train_batch)
    compute_s  time inside ForwardPass + BackwardPass + OptimizerStep
    idle_s     step_s - compute_s: blocked in receives/sends (waiting for a neighbour), the gradient
               all-reduces (ReduceGrads over dp, ReduceTiedGrads between first and last stage),
               loading micro-batches, and the engine's own bookkeeping (loss broadcast etc.)

and ``instructions`` has the seconds of each instruction kind (where the idle time went).

Which formula a measured number compares to. With p stages, m micro-batches, equal stages and free
communication, 1F1B keeps each stage busy m·(t_f + t_b) of a step of (m + p - 1)·(t_f + t_b), so:

    idle_fraction = idle_s / step_s     ~ (p - 1) / (m + p - 1)   ``pipeline_idle_fraction(p, m)``
    bubble_ratio  = idle_s / compute_s  ~ (p - 1) / m             ``pipeline_bubble(p, m)``

The second is Narayanan et al. (2021)'s "bubble time fraction": bubble time over ideal compute time.
Measured values exceed the formulas by the communication and optimizer time the model leaves out,
and differ between stages when the stages' compute is unequal (the embedding/head stages; the
slowest stage sets the pace, the others wait). OptimizerStep counts as compute here, so
``bubble_ratio`` uses the whole step's compute, not only the forward/backward the formula assumes;
``instructions`` has both to recompute it either way.

On an accelerator the instructions are asynchronous: ``synchronize`` (default: on when the engine's
device is not the CPU) waits for the device around each timed instruction, so a receive is charged
with its wait instead of its launch. That removes overlap between queued kernels and costs a little
time; the meter is for measurement runs, not for every training step.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from trainer.runtime.compat import wrap_pipe_instructions

COMPUTE = ("ForwardPass", "BackwardPass", "OptimizerStep")


@dataclass(frozen=True)
class StageBubble:
    """One step of one pipeline stage; ``dataclasses.asdict`` gives a loggable dict."""

    stage: int
    stages: int  # p
    micro_batches: int  # m
    step_s: float
    compute_s: float
    idle_s: float
    idle_fraction: float  # idle_s / step_s, compare formulas.pipeline_idle_fraction(p, m)
    bubble_ratio: float  # idle_s / compute_s, compare formulas.pipeline_bubble(p, m)
    instructions: dict[str, float] = field(default_factory=dict)  # seconds per instruction kind
    counts: dict[str, int] = field(default_factory=dict)  # executions per instruction kind

    def as_dict(self) -> dict:
        return asdict(self)


class BubbleMeter:
    """Times one ``PipelineEngine``'s instructions between ``start_step`` and ``end_step``:

        meter = BubbleMeter(engine)
        meter.start_step(); loss = engine.train_batch(it); rec = meter.end_step()
        # or: with meter.step() as result: engine.train_batch(it)   -> result[0] is the StageBubble

    Outside a step (e.g. ``eval_batch``) the handlers run untimed. ``close()`` removes the wrappers.
    The wrappers shadow the class's ``_INSTRUCTION_MAP`` on this engine instance only
    (``trainer.runtime.compat.wrap_pipe_instructions``; close wrappers in the reverse order of creation).
    """

    def __init__(self, engine, synchronize: bool | None = None):
        self.engine = engine
        self.synchronize = engine.device.type != "cpu" if synchronize is None else synchronize
        self._seconds: dict[str, float] = defaultdict(float)
        self._counts: Counter[str] = Counter()
        self._active = False
        self._t0 = 0.0
        self._restore = wrap_pipe_instructions(engine, self._timed)

    def _timed(self, name: str, handler: Callable) -> Callable:
        def run(engine, **kwargs):
            if not self._active:
                return handler(engine, **kwargs)
            self._sync()
            start = time.perf_counter()
            try:
                return handler(engine, **kwargs)
            finally:
                self._sync()
                self._seconds[name] += time.perf_counter() - start
                self._counts[name] += 1

        return run

    def _sync(self) -> None:
        if self.synchronize:
            torch.accelerator.synchronize()

    def start_step(self) -> None:
        self._seconds.clear()
        self._counts.clear()
        self._sync()
        self._active = True
        self._t0 = time.perf_counter()

    def end_step(self) -> StageBubble:
        if not self._active:
            raise RuntimeError("BubbleMeter.end_step without start_step")
        self._sync()
        step_s = time.perf_counter() - self._t0
        self._active = False
        compute_s = sum(self._seconds[name] for name in COMPUTE)
        idle_s = max(step_s - compute_s, 0.0)  # compute is timed inside the step, so <= step_s
        return StageBubble(
            stage=self.engine.stage_id,
            stages=self.engine.num_stages,
            micro_batches=self.engine.micro_batches,
            step_s=step_s,
            compute_s=compute_s,
            idle_s=idle_s,
            idle_fraction=idle_s / step_s if step_s > 0 else math.nan,
            bubble_ratio=idle_s / compute_s if compute_s > 0 else math.nan,
            instructions=dict(self._seconds),
            counts=dict(self._counts),
        )

    @contextmanager
    def step(self) -> Iterator[list[StageBubble]]:
        """Context manager around one step; the yielded list receives the StageBubble at exit."""
        result: list[StageBubble] = []
        self.start_step()
        try:
            yield result
        finally:
            result.append(self.end_step())

    def close(self) -> None:
        """Restore the engine's instruction map as it was before this meter."""
        self._restore()


def gather_stages(record: StageBubble, group: dist.ProcessGroup | None) -> list[StageBubble]:
    """Every stage's record of the same step, in stage order: an all-gather over ``group``, the
    pipeline group of this rank (``engine.grid.get_pipe_parallel_group()`` or ``mesh.pp_group``).
    Collective over the group; for logging all stages from one rank."""
    records: list[StageBubble | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, record, group=group)
    return sorted(records, key=lambda r: r.stage)
