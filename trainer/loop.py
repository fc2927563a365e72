"""Train and evaluate over a built DeepSpeed engine. Builds nothing; measures and logs.

One optimizer step = ``grad_accum`` micro-batches per data-parallel rank. DeepSpeed's engine
counts micro-steps itself and only reduces gradients and steps the optimizer at the boundary.
Host syncs (``.item()``) happen only on logged steps so the loop does not stall the device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from trainer.config import BatchPlan, TrainConfig
from trainer.hardware import peak_memory_bytes
from trainer.metrics import Console, MetricsLog
from trainer.parallel import CommStats, Mesh
from trainer.parallel.bubble import BubbleMeter, analytic_bubble, analytic_idle_fraction, gather_stages
from trainer.parallel.grad_norm import global_grad_norm
from trainer.parallel.mappings import all_reduce


@dataclass(frozen=True)
class Throughput:
    """What turns tokens/s into achieved FLOP/s and MFU."""

    flops_per_token: float  # model FLOPs per trained token (trainer.analytic.flops_per_token)
    peak_flops_per_rank: float  # the device's peak FLOP/s (trainer.hardware.peak_flops)
    world_size: int


@dataclass
class FitResult:
    steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # every logged step's loss

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


def dp_mean(value: torch.Tensor, mesh: Mesh, stats: CommStats) -> float:
    """Mean of a scalar over the data-parallel group (one host sync)."""
    total = all_reduce(value.detach().float().clone(), mesh.dp_group, stats)
    return total.item() / mesh.dims.dp


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

    def train_step(self) -> tuple[torch.Tensor, float | None]:
        """Forward/backward over grad_accum micro-batches, then the optimizer step.

        Returns this rank's mean micro-batch loss (a device tensor) and the gradient norm
        before clipping (None if the engine does not report it).
        """
        if self.pipelined:
            return self._pipeline_step()
        total = torch.zeros((), device=self.device)
        grad_norm = None
        for _ in range(self.plan.grad_accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.stream.next_micro_batch())
            loss = self.engine(x, y)
            self.engine.backward(loss)
            total += loss.detach().float()
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm_without_zero()
            self.engine.step()
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = float(reported)
        return total / self.plan.grad_accum, grad_norm

    def _pipeline_step(self) -> tuple[torch.Tensor, float | None]:
        """DeepSpeed's 1F1B schedule over grad_accum micro-batches. Every stage draws them from its
        stream (only the first and last stage read them) so all streams stay at the same position."""
        micro_batches = [self.stream.next_micro_batch() for _ in range(self.plan.grad_accum)]
        self.bubble.start_step()
        loss = self.engine.train_batch(iter(micro_batches))  # the dp-mean, on every stage
        self.last_bubble = self.bubble.end_step()
        norm = self.engine.get_global_grad_norm()
        return loss.detach().float(), None if norm is None else float(norm)

    def _grad_norm_without_zero(self) -> float | None:
        """Without ZeRO the engine clips but does not keep the norm; compute it once here."""
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

    def fit(self, start_step: int = 0) -> FitResult:
        result = FitResult(steps=self.cfg.steps)
        self.engine.train()
        for step in range(start_step, self.cfg.steps):
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in step())
            t0 = time.perf_counter()
            self.tp_comm.reset()
            loss, grad_norm = self.train_step()
            if (step + 1) % self.cfg.log_interval == 0 or step == start_step or step + 1 == self.cfg.steps:
                self._log_step(step, dp_mean(loss, self.mesh, self.comm), lr, grad_norm, t0, result)
            self._maybe_evaluate(step, result)
            self._maybe_save(step)
            self.console.advance(step + 1, f"loss {result.last_loss:.4f}" if result.last_loss else "")
        return result

    def _log_step(self, step, loss, lr, grad_norm, t0, result: FitResult) -> None:
        step_time = time.perf_counter() - t0  # includes the loss all-reduce: an honest wall time
        tokens_per_s = self.plan.tokens_per_step / step_time
        tp = self.throughput
        flops_per_rank = tokens_per_s * tp.flops_per_token / tp.world_size
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tflops_per_rank": flops_per_rank / 1e12,
            "mfu": flops_per_rank / tp.peak_flops_per_rank,
            "peak_mem_mb": peak_memory_bytes(self.device) / 2**20,  # this rank (rank 0 writes)
        }
        record.update(self._tp_comm_record())
        if self.pipelined:
            record.update(self._bubble_record())
        self.metrics.log(record)
        result.losses.append(loss)
        result.first_loss = loss if result.first_loss is None else result.first_loss
        result.last_loss = loss
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        self.console.print(
            f"step {step + 1:>6}/{self.cfg.steps}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {norm}  "
            f"{tokens_per_s:,.0f} tok/s  mfu {record['mfu']:.1%}"
        )

    def _tp_comm_record(self) -> dict:
        """This step's tensor-parallel collectives on this rank: per kind count, bytes and seconds."""
        kinds = self.tp_comm.snapshot()
        return {
            "tp_comm": {
                k: {"count": r.count, "bytes": r.bytes, "seconds": round(r.seconds, 6)} for k, r in kinds.items()
            },
            "tp_comm_bytes": sum(r.bytes for r in kinds.values()),
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
