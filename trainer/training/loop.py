"""Train and evaluate over a built DeepSpeed engine. Builds nothing; measures and logs.

One optimizer step = ``grad_accum`` micro-batches per data-parallel rank. DeepSpeed's engine
counts micro-steps itself and only reduces gradients and steps the optimizer at the boundary.

Logged steps are measured steps: they time each phase (waiting for the device between phases),
turn on DeepSpeed's communication logger, count tensor memory by kind and saved activations, and
gather every rank's numbers to rank 0. Every other step runs bare: no host syncs (``.item()``),
no gradient norm of our own, no hooks -- so the throughput of unlogged steps is the engine's own.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trainer.analysis.formulas import wire_bytes
from trainer.config.schema import BatchPlan, TrainConfig
from trainer.parallel import CommStats, Mesh
from trainer.parallel.bubble import BubbleMeter, analytic_bubble, analytic_idle_fraction, gather_stages
from trainer.parallel.grad_norm import global_grad_norm
from trainer.parallel.mappings import all_reduce
from trainer.runtime.compat import wrap_pipe_instructions
from trainer.runtime.hardware import current_rss_bytes, peak_memory_bytes
from trainer.training.guard import SkipCounter
from trainer.training.metrics import (
    ActivationMeter,
    Console,
    DeepSpeedComms,
    MetricsLog,
    PhaseClock,
    TensorCensus,
    cpu_seconds,
)


@dataclass(frozen=True)
class Throughput:
    """What turns tokens/s into achieved FLOP/s and MFU."""

    flops_per_token: float  # model FLOPs per trained token (trainer.analysis.formulas.flops_per_token)
    peak_flops_per_rank: float  # the device's peak FLOP/s (trainer.runtime.hardware.peak_flops)
    world_size: int


@dataclass
class FitResult:
    steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # every logged step's loss

    def record(self, loss: float) -> None:
        self.losses.append(loss)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


def dp_mean(value: torch.Tensor, mesh: Mesh, stats: CommStats) -> float:
    """Mean of a scalar over the data-parallel group (one host sync)."""
    total = all_reduce(value.detach().float().clone(), mesh.dp_group, stats)
    return total.item() / mesh.dims.dp


# Pipeline instructions (deepspeed.runtime.pipe.schedule) -> the phase they are timed as; the rest
# (sends, receives, gradient reductions) are communication, waiting for the neighbour included.
PIPE_PHASES = {
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "OptimizerStep": "optimizer",
    "LoadMicroBatch": "data",
}


class Trainer:
    def __init__(
        self,
        engine,
        stream,
        eval_batches,
        train: TrainConfig,
        plan: BatchPlan,
        device: torch.device,
        mesh: Mesh,
        throughput: Throughput,
        tp_comm: CommStats,
        metrics: MetricsLog,
        console: Console,
        save,
    ):
        self.engine, self.stream, self.eval_data = engine, stream, eval_batches
        self.cfg, self.plan, self.device, self.mesh = train, plan, device, mesh
        self.metrics, self.console, self.save = metrics, console, save
        self.throughput = throughput
        self.tp_comm = tp_comm  # the tensor-parallel layers' collectives, reset every step
        self.comm = CommStats()  # the loop's own reductions (loss, gradient norm)
        self.pipelined = mesh.dims.pp > 1
        self.bubble = BubbleMeter(engine) if self.pipelined else None
        self.skips = SkipCounter(engine, train.max_skipped_steps)  # non-finite steps (trainer.training.guard)
        self.measuring = False
        self.ds_comms = DeepSpeedComms()
        self.clock = PhaseClock(device, self._comm_seconds)
        self.census = TensorCensus(engine.module, engine.optimizer)
        self.activations = ActivationMeter(engine.module)
        if self.pipelined:
            self._tap_pipeline_instructions()

    def _comm_seconds(self) -> float:
        return self.ds_comms.seconds() + sum(self.tp_comm[k].seconds for k in self.tp_comm.kinds())

    def train_step(self) -> tuple[torch.Tensor, float | None]:
        """Forward/backward over grad_accum micro-batches, then the optimizer step.

        Returns this rank's mean micro-batch loss (a device tensor) and, on measured steps, the
        gradient norm before clipping (None otherwise, or if the engine does not report it).
        """
        if self.pipelined:
            return self._pipeline_step()
        total = torch.zeros((), device=self.device)
        grad_norm = None
        clock = self.clock
        for _ in range(self.plan.grad_accum):
            with clock.phase("data"):
                x, y = (t.to(self.device, non_blocking=True) for t in self.stream.next_micro_batch())
            with clock.phase("forward"), self._saving():
                loss = self.engine(x, y)
            with clock.phase("backward"):
                self.engine.backward(loss)
            total += loss.detach().float()
            if self.measuring:
                self.census.sample()  # gradients are largest here
                if self.engine.is_gradient_accumulation_boundary():
                    grad_norm = self._grad_norm_without_zero()
            with clock.phase("optimizer"):
                self.engine.step()
        return total / self.plan.grad_accum, self._reported_grad_norm(grad_norm)

    def _saving(self):
        return self.activations.track() if self.measuring else nullcontext()

    def _reported_grad_norm(self, fallback: float | None) -> float | None:
        if not self.measuring:
            return None
        self.census.sample()  # after the step: optimizer states exist
        reported = self.engine.get_global_grad_norm()
        return fallback if reported is None else float(reported)

    def _pipeline_step(self) -> tuple[torch.Tensor, float | None]:
        """DeepSpeed's 1F1B schedule over grad_accum micro-batches. Every stage draws them from its
        stream (only the first and last stage read them) so all streams stay at the same position."""
        with self.clock.phase("data"):
            micro_batches = [self.stream.next_micro_batch() for _ in range(self.plan.grad_accum)]
        self.bubble.start_step()
        with self._saving():
            loss = self.engine.train_batch(iter(micro_batches))  # the dp-mean, on every stage
        self.last_bubble = self.bubble.end_step()
        return loss.detach().float(), self._reported_grad_norm(None)

    def _tap_pipeline_instructions(self) -> None:
        """Time the pipeline's instructions by phase and sample memory around backward and the
        optimizer step (measured steps only), by wrapping the engine's instruction handlers as
        ``BubbleMeter`` does (over its wrappers; ``fit`` undoes both at the end)."""
        clock, census = self.clock, self.census

        def tap(name, handler):
            phase = PIPE_PHASES.get(name, "pipe_comm")

            def run(engine, **kwargs):
                if not self.measuring:
                    return handler(engine, **kwargs)
                if name == "OptimizerStep":
                    census.sample()  # the gradients, before the step consumes them
                with clock.phase(phase):
                    out = handler(engine, **kwargs)
                if name in ("BackwardPass", "OptimizerStep"):
                    census.sample()
                return out

            return run

        self._untap_pipeline = wrap_pipe_instructions(self.engine, tap)

    def _grad_norm_without_zero(self) -> float | None:
        """Without ZeRO the engine clips but does not keep the norm; compute it (measured steps only)."""
        if self.engine.zero_optimization_stage() > 0:
            return None
        return global_grad_norm(self.engine.module.parameters(), self.mesh, self.comm)

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.pipelined:
            loss = self.engine.eval_batch(iter(self.eval_data), num_micro_batches=len(self.eval_data))
            return dp_mean(loss, self.mesh, self.comm)
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.eval_data:
            total += self.engine(x.to(self.device), y.to(self.device)).float()
        self.engine.train()
        return dp_mean(total / len(self.eval_data), self.mesh, self.comm)

    def _is_logged(self, step: int, start_step: int) -> bool:
        return (step + 1) % self.cfg.log_interval == 0 or step == start_step or step + 1 == self.cfg.steps

    def fit(self, start_step: int = 0) -> FitResult:
        result = FitResult(steps=self.cfg.steps)
        self.engine.train()
        window = Window()
        for step in range(start_step, self.cfg.steps):
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in step())
            self._begin_step(self._is_logged(step, start_step))
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            window.steps += 1
            if self.measuring:
                self._log_step(step, loss, lr, grad_norm, t0, window, result)
            if self.skips.update(step + 1):  # raises TooManySkips before this step could be saved
                self.console.print(
                    f"step {step + 1}: non-finite loss or gradient, update skipped ({self.skips.in_a_row} in a row)"
                )
            self._maybe_evaluate(step, result)
            self._maybe_save(step)
            if self.measuring:
                self.measuring = False
                window = Window()
            self.console.advance(step + 1, f"loss {result.last_loss:.4f}" if result.last_loss else "")
        if self.pipelined:  # the engine's instruction map as it was: the last wrapper first
            self._untap_pipeline()
            self.bubble.close()
        return result

    def _begin_step(self, measure: bool) -> None:
        self.measuring = measure
        self.tp_comm.reset()
        self.clock.start(measure)
        if measure:
            self.ds_comms.start()
            self.census.reset()
            self._cpu0 = cpu_seconds()

    def _log_step(self, step, loss, lr, grad_norm, t0, window: Window, result: FitResult) -> None:
        ds_comm = self.ds_comms.stop()  # before the loop's own reduction of the loss
        cpu_s = cpu_seconds() - self._cpu0
        loss = dp_mean(loss, self.mesh, self.comm)
        now = time.perf_counter()
        step_time = now - t0  # includes the loss all-reduce: an honest wall time
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        record["skipped_steps"] = self.engine.skipped_steps  # non-finite steps so far, not applied
        record.update(speed_record(self.plan.tokens_per_step, step_time, window, now, self.throughput, self.device))
        record.update(self._tp_comm_record())
        record.update(_ds_comm_record(ds_comm))
        if self.pipelined:
            record.update(self._bubble_record())
        record["ranks"] = self._gather_ranks(record, step_time, cpu_s)
        self.metrics.log(record)
        result.record(loss)
        self.console.print(step_line(record, self.cfg.steps))

    def _gather_ranks(self, record: dict, step_time: float, cpu_s: float) -> list[dict]:
        """Every rank's memory, time breakdown, communication and CPU use of this step, in rank order
        (one all_gather_object over the world, outside the timed step)."""
        mine = {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "coords": {"tp": self.mesh.coords.tp, "pp": self.mesh.coords.pp, "dp": self.mesh.coords.dp},
            "positions": self._pipeline_positions(),
            **rank_measurements(self.engine.module, self.device, self.census, self.activations, cpu_s, step_time),
            "time": self.clock.breakdown(step_time),
            **{k: record[k] for k in ("tp_comm", "tp_comm_bytes", "tp_comm_wire_bytes", "tp_comm_s")},
            **{k: record[k] for k in ("ds_comm", "ds_comm_bytes", "ds_comm_wire_bytes", "ds_comm_s")},
        }
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [mine]
        everyone: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def _pipeline_positions(self) -> list[int]:
        """[first, stop) of the pipeline positions this rank runs (trainer.parallel.pipeline's table)."""
        module = self.engine.module
        if self.pipelined:
            stage = self.mesh.coords.pp
            return [int(module.parts[stage]), int(module.parts[stage + 1])]
        return [0, module.shape.n_layer + 3]  # the whole GPT

    def _tp_comm_record(self) -> dict:
        """This step's tensor-parallel collectives on this rank: per kind count, bytes and seconds."""
        kinds = self.tp_comm.snapshot()
        t = self.mesh.dims.tp
        return {
            "tp_comm": {
                k: {"count": r.count, "bytes": r.bytes, "seconds": round(r.seconds, 6)} for k, r in kinds.items()
            },
            "tp_comm_bytes": sum(r.bytes for r in kinds.values()),
            "tp_comm_wire_bytes": sum(wire_bytes(k, r.bytes, t) for k, r in kinds.items()),
            "tp_comm_s": sum(r.seconds for r in kinds.values()),
        }

    def _bubble_record(self) -> dict:
        """Each stage's idle share of the last step beside the 1F1B prediction (collective over pp)."""
        stages = gather_stages(self.last_bubble, self.mesh.pp_group)
        p, m = self.mesh.dims.pp, self.plan.grad_accum
        return {
            "pipe_idle_fraction": [round(r.idle_fraction, 4) for r in stages],  # idle / step
            "pipe_idle_fraction_analytic": analytic_idle_fraction(p, m),  # (p-1)/(m+p-1)
            "pipe_bubble_ratio": [round(r.bubble_ratio, 4) for r in stages],  # idle / compute
            "pipe_bubble_ratio_analytic": analytic_bubble(p, m),  # (p-1)/m
        }

    def _maybe_evaluate(self, step: int, result: FitResult) -> None:
        last = step + 1 == self.cfg.steps
        if not last and (self.cfg.eval_interval == 0 or (step + 1) % self.cfg.eval_interval):
            return
        result.val_loss = self.evaluate()
        self.metrics.log({"step": step + 1, "val_loss": result.val_loss, "val_ppl": result.val_ppl})
        self.console.print(f"step {step + 1:>6}  val_loss {result.val_loss:.4f}  val_ppl {result.val_ppl:.2f}")

    def _maybe_save(self, step: int) -> None:
        interval = self.cfg.save_interval
        last = step + 1 == self.cfg.steps
        if interval == -1 or not (last or (interval > 0 and (step + 1) % interval == 0)):
            return
        self.save(step + 1)


def _ds_comm_record(totals: dict) -> dict:
    """DeepSpeed's collectives of the step on this rank, per "<kind>@<group size>"."""
    return {
        "ds_comm": {k: v.as_dict() for k, v in totals.items()},
        "ds_comm_bytes": sum(v.bytes for v in totals.values()),
        "ds_comm_wire_bytes": sum(v.wire_bytes for v in totals.values()),
        "ds_comm_s": sum(v.seconds for v in totals.values()),
    }


# --- shared with trainer.baseline, so both loops report the same quantities the same way ---------


@dataclass
class Window:
    """The steps since the last logged one: mostly unmeasured, so their throughput is the loop's own."""

    start: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=cpu_seconds)  # this process's CPU seconds at the start
    steps: int = 0


def speed_record(tokens: int, step_s: float, window: Window, now: float, tp: Throughput, device) -> dict:
    """Throughput of one step (``tokens`` trained in ``step_s``) and of the ``window`` of steps since the
    last logged one, achieved FLOP/s and MFU, and this rank's peak memory."""
    tokens_per_s = tokens / step_s
    flops_per_rank = tokens_per_s * tp.flops_per_token / tp.world_size
    return {
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        # mostly unmeasured steps: the loop's own speed, without the instruments of logged steps
        "window_tokens_per_s": window.steps * tokens / (now - window.start),
        # per CPU second of this process: what other processes on a shared machine change least
        "window_tokens_per_cpu_s": window.steps * tokens / max(cpu_seconds() - window.cpu, 1e-9),
        "tflops_per_rank": flops_per_rank / 1e12,
        "mfu": flops_per_rank / tp.peak_flops_per_rank,
        "peak_mem_mb": peak_memory_bytes(device) / 2**20,  # this rank (rank 0 writes)
    }


def rank_measurements(module, device, census: TensorCensus, activations: ActivationMeter, cpu_s, step_s) -> dict:
    """This rank's memory by kind, peak and current memory, CPU use, and the size of its model shard."""
    return {
        "shard_params": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
        "peak_mem_bytes": peak_memory_bytes(device),
        "rss_bytes": current_rss_bytes(),
        "cpu_percent": round(100 * cpu_s / step_s, 1),  # 100 = one core busy for the whole step
        "mem": {**census.peak, "activations": activations.peak},
    }


def step_line(record: dict, steps: int) -> str:
    norm = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
    return (
        f"step {record['step']:>6}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  grad_norm {norm}  "
        f"{record['tokens_per_s']:,.0f} tok/s  mfu {record['mfu']:.1%}"
    )
