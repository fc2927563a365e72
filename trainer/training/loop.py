"""The training loop over a built DeepSpeed engine. Builds nothing; steps, evaluates, saves, logs.

One optimizer step = ``grad_accum`` micro-batches per data-parallel rank (``trainer.training.steps``
runs it, per engine kind). Logged steps are measured steps: the instruments time each phase, log
DeepSpeed's collectives, count tensor memory by kind and saved activations, and every rank's numbers
are gathered to rank 0 into one ``StepRecord``. Every other step runs bare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config.schema import BatchPlan, TrainConfig
from trainer.parallel import CommStats, Mesh
from trainer.parallel.dp_sync import DPSync
from trainer.parallel.mappings import gather_objects
from trainer.training.guard import SkipCounter
from trainer.training.instruments import StepInstruments
from trainer.training.output import Console, MetricsLog
from trainer.training.preempt import Preempted, StopSignal
from trainer.training.profiler import StepProfiler
from trainer.training.record import (
    EvalRecord,
    FitResult,
    SampleRecord,
    StepRecord,
    Throughput,
    Window,
    is_logged,
    speed_fields,
)
from trainer.training.samples import Samples
from trainer.training.steps import DenseSteps, PipelineSteps, dp_mean


@dataclass
class LoopParts:
    """What the loop drives, assembled by ``trainer.training.run``."""

    engine: object  # DeepSpeedEngine or PipelineEngine
    stream: object  # this rank's SampleStream (trainer.data.stream)
    eval_data: list  # this rank's validation micro-batches
    train: TrainConfig
    plan: BatchPlan
    mesh: Mesh
    device: torch.device
    throughput: Throughput
    tp_comm: CommStats  # the tensor-parallel layers' collectives
    metrics: MetricsLog
    console: Console
    save: Callable[[int], None]  # writes the checkpoint of a step
    stop: StopSignal | None = None  # a scheduler's signal: save and stop after the step (training.preempt)
    samples: Samples | None = None  # rank 0's prompts to continue after each validation pass (training.samples)
    dp_sync: DPSync | None = None  # parallel.dp_sync's hooks (trainer.parallel.dp_sync); None = the engine's all-reduce
    profiler: StepProfiler | None = None  # train.profile_* (trainer.training.profiler)


class Trainer:
    def __init__(self, parts: LoopParts):
        self.p = parts
        engine, mesh = parts.engine, parts.mesh
        self.comm = CommStats()  # the loop's own reductions (loss, gradient norm)
        self.sync = parts.dp_sync or DPSync()
        dims = mesh.dims
        self.inst = StepInstruments(
            engine.module, engine.optimizer, parts.device, parts.tp_comm, dims.tp, self.sync.comm, dims.dp
        )
        runner = PipelineSteps if mesh.dims.pp > 1 else DenseSteps
        self.steps = runner(engine, parts.stream, parts.plan, parts.device, mesh, self.inst, self.comm, self.sync)
        self.skips = SkipCounter(engine, parts.train.max_skipped_steps)  # non-finite steps (training.guard)

    def fit(self, start_step: int = 0) -> FitResult:
        cfg, console = self.p.train, self.p.console
        result = FitResult(steps=cfg.steps)
        self.p.engine.train()
        window = Window()
        profiler = self.p.profiler or StepProfiler.off()
        try:
            for step in range(start_step, cfg.steps):
                lr = self.p.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in step())
                measure = is_logged(step, start_step, cfg.log_interval, cfg.steps)
                self.inst.begin(measure)
                profiler.step_begins(step + 1)
                t0 = time.perf_counter()
                loss, grad_norm = self.steps.train_step()
                with self.inst.clock.phase("dp_sync"):
                    self.sync.after_step(step + 1)
                if written := profiler.step_ends(step + 1):
                    console.print(written)
                window.steps += 1
                if measure:
                    self._log_step(step, loss, lr, grad_norm, t0, window, result)
                if self.skips.update(step + 1):  # raises TooManySkips before this step could be saved
                    console.print(
                        f"step {step + 1}: non-finite loss or gradient, update skipped ({self.skips.in_a_row} in a row)"
                    )
                self._maybe_evaluate(step, result)
                saved = self._maybe_save(step)
                self._stop_if_signalled(step, saved)
                if measure:
                    self.inst.measuring = False
                    window = Window()
                console.advance(step + 1, f"loss {result.last_loss:.4f}" if result.last_loss else "")
        finally:
            self.steps.close()  # the engine's instruction map as it was
            self.inst.close()
            profiler.close()
        return result

    def _log_step(self, step, loss, lr, grad_norm, t0, window: Window, result: FitResult) -> None:
        ds, tp, dp, cpu_s = self.inst.end()
        loss = dp_mean(loss, self.p.mesh, self.comm)
        now = time.perf_counter()
        step_time = now - t0  # includes the loss all-reduce: an honest wall time
        pipe = self.steps.pipe_fields()  # collective over the pipeline group
        coords = self.p.mesh.coords
        mine = self.inst.rank_record(
            dist.get_rank() if dist.is_initialized() else 0,
            {"tp": coords.tp, "pp": coords.pp, "dp": coords.dp},
            self.steps.positions(),
            step_time,
            cpu_s,
            tp,
            ds,
            dp,
        )
        record = StepRecord(
            step=step + 1,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            skipped_steps=self.p.engine.skipped_steps,
            ranks=gather_objects(mine),  # every rank's, in rank order (outside the timed step)
            tp_comm=tp,
            ds_comm=ds,
            pipe=pipe,
            dp_comm=dp,
            loss_scale=float(self.p.engine.optimizer.loss_scale) if self.p.engine.fp16_enabled() else None,
            **speed_fields(self.p.plan.tokens_per_step, step_time, window, now, self.p.throughput, self.p.device),
        )
        self.p.metrics.log(record.to_dict())
        result.record(loss)
        self.p.console.print(record.line(self.p.train.steps))

    def evaluate(self) -> float:
        return self.steps.evaluate(self.p.eval_data)

    def _maybe_evaluate(self, step: int, result: FitResult) -> None:
        cfg = self.p.train
        last = step + 1 == cfg.steps
        if not last and (cfg.eval_interval == 0 or (step + 1) % cfg.eval_interval):
            return
        result.val_loss = self.evaluate()
        self.p.metrics.log(EvalRecord(step + 1, result.val_loss, result.val_ppl).to_dict())
        self.p.console.print(f"step {step + 1:>6}  val_loss {result.val_loss:.4f}  val_ppl {result.val_ppl:.2f}")
        if self.p.samples is not None:
            record = SampleRecord(step + 1, self.p.samples.generate(self.p.engine.module))
            self.p.metrics.log(record.to_dict())
            for line in record.lines():
                self.p.console.print(line)

    def _maybe_save(self, step: int) -> bool:
        interval, last = self.p.train.save_interval, step + 1 == self.p.train.steps
        if interval == -1 or not (last or (interval > 0 and (step + 1) % interval == 0)):
            return False
        self.p.save(step + 1)
        return True

    def _stop_if_signalled(self, step: int, saved: bool) -> None:
        """After a scheduler's signal to any rank: every rank saves this step (once) and stops."""
        stop = self.p.stop
        if stop is None or step + 1 == self.p.train.steps or not stop.agreed(self.p.device):
            return  # (the last step ends the run as usual)
        can_save = self.p.train.save_interval != -1
        if can_save and not saved:
            self.p.save(step + 1)
        raise Preempted(step + 1, stop.name, can_save)
