"""One optimizer step and one validation pass over a built engine, per engine kind:

    DenseSteps      DeepSpeedEngine (any ZeRO stage, tp): grad_accum forward/backward micro-steps; the
                    engine reduces gradients and steps the optimizer at the accumulation boundary (or, under
                    another parallel.dp_sync, its hook synchronises them: trainer.parallel.dp_sync)
    PipelineSteps   PipelineEngine: DeepSpeed's 1F1B schedule runs the micro-batches (train_batch)

Both read the instruments only on measured steps (``StepInstruments.measuring``), so every other step
runs bare: no host syncs, no gradient norm of our own, no hooks.
"""

from __future__ import annotations

import torch

from trainer.analysis.formulas import pipeline_bubble, pipeline_idle_fraction
from trainer.config.schema import BatchPlan
from trainer.parallel import CommStats, Mesh
from trainer.parallel.bubble import BubbleMeter, gather_stages
from trainer.parallel.dp_sync import DPSync
from trainer.parallel.grad_norm import global_grad_norm
from trainer.parallel.mappings import all_reduce
from trainer.runtime.compat import wrap_pipe_instructions
from trainer.training.instruments import StepInstruments

# Pipeline instructions (deepspeed.runtime.pipe.schedule) -> the phase they are timed as; the rest
# (sends, receives, gradient reductions) are communication, waiting for the neighbour included.
PIPE_PHASES = {
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "OptimizerStep": "optimizer",
    "LoadMicroBatch": "data",
}


def dp_mean(value: torch.Tensor, mesh: Mesh, stats: CommStats) -> float:
    """Mean of a scalar over the data-parallel group (one host sync)."""
    total = all_reduce(value.detach().float().clone(), mesh.dp_group, stats)
    return total.item() / mesh.dims.dp


class DenseSteps:
    def __init__(
        self, engine, stream, plan: BatchPlan, device, mesh: Mesh, inst: StepInstruments, comm: CommStats, sync: DPSync
    ):
        self.engine, self.stream, self.plan, self.device, self.mesh = engine, stream, plan, device, mesh
        self.inst = inst
        self.comm = comm  # the loop's own reductions (loss, gradient norm)
        self.sync = sync  # parallel.dp_sync's hooks (a pipeline has DeepSpeed's all-reduce only)

    def train_step(self) -> tuple[torch.Tensor, float | None]:
        """Forward/backward over grad_accum micro-batches, then the optimizer step. Returns this rank's
        mean micro-batch loss (a device tensor) and, on measured steps, the gradient norm before
        clipping (None otherwise, or if the engine does not report it)."""
        total = torch.zeros((), device=self.device)
        grad_norm = None
        clock = self.inst.clock
        for _ in range(self.plan.grad_accum):
            with clock.phase("data"):
                x, y = (t.to(self.device, non_blocking=True) for t in self.stream.next_micro_batch())
            with clock.phase("forward"), self.inst.saving():
                loss = self.engine(x, y)
            with clock.phase("backward"):
                self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                with clock.phase("dp_sync"):
                    self.sync.after_backward()  # before the gradient norm: it is the synchronised gradient's
            total += loss.detach().float()
            if self.inst.measuring:
                self.inst.census.sample()  # gradients are largest here
                if self.engine.is_gradient_accumulation_boundary():
                    grad_norm = self._grad_norm_without_zero()
            with clock.phase("optimizer"):
                self.engine.step()
        return total / self.plan.grad_accum, self.reported_grad_norm(grad_norm)

    def reported_grad_norm(self, fallback: float | None) -> float | None:
        if not self.inst.measuring:
            return None
        self.inst.census.sample()  # after the step: optimizer states exist
        reported = self.engine.get_global_grad_norm()
        return fallback if reported is None else float(reported)

    def _grad_norm_without_zero(self) -> float | None:
        """Without ZeRO the engine clips but does not keep the norm; compute it (measured steps only)."""
        if self.engine.zero_optimization_stage() > 0:
            return None
        return global_grad_norm(self.engine.module.parameters(), self.mesh, self.comm)

    @torch.no_grad()
    def evaluate(self, eval_data: list) -> float:
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for x, y in eval_data:
            total += self.engine(x.to(self.device), y.to(self.device)).float()
        self.engine.train()
        return dp_mean(total / len(eval_data), self.mesh, self.comm)

    def positions(self) -> list[int]:
        """[first, stop) of the pipeline positions this rank runs (trainer.parallel.pipeline's table)."""
        return [0, self.engine.module.shape.n_layer + 3]  # the whole GPT

    def pipe_fields(self) -> dict:
        return {}

    def close(self) -> None:
        """Undo what the runner changed on the engine."""


class PipelineSteps(DenseSteps):
    """The engine's schedule runs each step; its instruction handlers are wrapped twice, by the bubble
    meter (inner) and by the phase/memory tap (outer), and ``close`` undoes both, outer first."""

    def __init__(
        self, engine, stream, plan: BatchPlan, device, mesh: Mesh, inst: StepInstruments, comm: CommStats, sync: DPSync
    ):
        super().__init__(engine, stream, plan, device, mesh, inst, comm, sync)
        self.bubble = BubbleMeter(engine)
        self.last_bubble = None
        self._untap = wrap_pipe_instructions(engine, self._tap)

    def _tap(self, name, handler):
        """Time an instruction by phase and sample memory around backward and the optimizer step."""
        inst, phase = self.inst, PIPE_PHASES.get(name, "pipe_comm")

        def run(engine, **kwargs):
            if not inst.measuring:
                return handler(engine, **kwargs)
            if name == "OptimizerStep":
                inst.census.sample()  # the gradients, before the step consumes them
            with inst.clock.phase(phase):
                out = handler(engine, **kwargs)
            if name in ("BackwardPass", "OptimizerStep"):
                inst.census.sample()
            return out

        return run

    def train_step(self) -> tuple[torch.Tensor, float | None]:
        """DeepSpeed's 1F1B schedule over grad_accum micro-batches. Every stage draws them from its
        stream (only the first and last stage read them) so all streams stay at the same position."""
        with self.inst.clock.phase("data"):
            micro_batches = [self.stream.next_micro_batch() for _ in range(self.plan.grad_accum)]
        self.bubble.start_step()
        with self.inst.saving():
            loss = self.engine.train_batch(iter(micro_batches))  # the dp-mean, on every stage
        self.last_bubble = self.bubble.end_step()
        return loss.detach().float(), self.reported_grad_norm(None)

    @torch.no_grad()
    def evaluate(self, eval_data: list) -> float:
        loss = self.engine.eval_batch(iter(eval_data), num_micro_batches=len(eval_data))
        return dp_mean(loss, self.mesh, self.comm)

    def positions(self) -> list[int]:
        stage, parts = self.mesh.coords.pp, self.engine.module.parts
        return [int(parts[stage]), int(parts[stage + 1])]

    def pipe_fields(self) -> dict:
        """Each stage's idle share of the last step beside the 1F1B prediction (collective over pp)."""
        stages = gather_stages(self.last_bubble, self.mesh.pp_group)
        p, m = self.mesh.dims.pp, self.plan.grad_accum
        return {
            "pipe_idle_fraction": [round(r.idle_fraction, 4) for r in stages],  # idle / step
            "pipe_idle_fraction_analytic": pipeline_idle_fraction(p, m),  # (p-1)/(m+p-1)
            "pipe_bubble_ratio": [round(r.bubble_ratio, 4) for r in stages],  # idle / compute
            "pipe_bubble_ratio_analytic": pipeline_bubble(p, m),  # (p-1)/m
        }

    def close(self) -> None:
        self._untap()  # the last wrapper first
        self.bubble.close()
