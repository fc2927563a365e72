"""The reference the trainer is measured against: the identical GPT trained by a plain PyTorch loop on
one process -- ``torch.optim.AdamW``, ``clip_grad_norm_``, the same learning-rate schedule, the same
data stream and batch, no DeepSpeed, no process group.

    python -m trainer.baseline [the same overrides as trainer.train]

It writes what ``trainer.train`` writes (metrics.jsonl with the same fields, summary.json, config.yaml)
into its Hydra run directory, and measures logged steps with the same instruments, so its numbers
and the trainer's compare one to one. Only the parallel layout is ignored: it is always one process.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import Config
from trainer.config.validate import validate
from trainer.training.instruments import cpu_seconds
from trainer.training.record import (
    EvalRecord,
    FitResult,
    RankRecord,
    StepRecord,
    Throughput,
    Window,
    finish,
    is_logged,
    rank_fields,
    speed_fields,
)


class BaselineLoop:
    """Micro-batches of loss/grad_accum backward, then clip, step, schedule, zero -- what DeepSpeed's
    engine does at world size 1, written out."""

    def __init__(self, cfg: Config, model, stream, val, plan, throughput, metrics, console, device):
        from trainer.runtime.engine import param_groups
        from trainer.training.instruments import ActivationMeter, PhaseClock, TensorCensus
        from trainer.training.schedule import scheduler_factory

        o = cfg.optim
        self.cfg, self.model, self.stream, self.val, self.plan = cfg, model, stream, val, plan
        self.throughput, self.metrics, self.console, self.device = throughput, metrics, console, device
        self.optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = scheduler_factory(o, cfg.train.steps)(self.optimizer)
        self.clock = PhaseClock(device, lambda: 0.0)  # one process: no communication
        self.census = TensorCensus(model, self.optimizer)
        self.activations = ActivationMeter(model)
        self.measuring = False

    def step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        accum, clock = self.plan.grad_accum, self.clock
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            with clock.phase("data"):
                x, y = (t.to(self.device, non_blocking=True) for t in self.stream.next_micro_batch())
            with clock.phase("forward"), self.activations.track() if self.measuring else nullcontext():
                loss = self.model(x, y)
            with clock.phase("backward"):
                (loss / accum).backward()
            total += loss.detach().float()
        if self.measuring:
            self.census.sample()
        with clock.phase("optimizer"):
            clip = self.cfg.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.measuring:
            self.census.sample()
        return total / accum, norm

    def fit(self) -> FitResult:
        t = self.cfg.train
        result = FitResult(steps=t.steps)
        self.model.train()
        window = Window()
        for step in range(t.steps):
            self.measuring = is_logged(step, 0, t.log_interval, t.steps)
            self.clock.start(self.measuring)
            lr = self.scheduler.get_last_lr()[0]
            if self.measuring:
                self.census.reset()
                cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            loss, norm = self.step()
            window.steps += 1
            if self.measuring:
                self._log(step, loss.item(), lr, norm.item(), t0, window, cpu_seconds() - cpu0, result)
                window = Window()
        result.val_loss = self.evaluate()
        self.metrics.log(EvalRecord(t.steps, result.val_loss, result.val_ppl).to_dict())
        return result

    def _log(self, step, loss, lr, norm, t0, window, cpu_s, result) -> None:
        now = time.perf_counter()
        step_s = now - t0
        mine = RankRecord(
            rank=0,
            coords={"tp": 0, "pp": 0, "dp": 0},
            positions=[0, self.cfg.model.n_layer + 3],
            time=self.clock.breakdown(step_s),
            **rank_fields(self.model, self.device, self.census, self.activations, cpu_s, step_s),
        )
        speed = speed_fields(self.plan.tokens_per_step, step_s, window, now, self.throughput, self.device)
        record = StepRecord(step + 1, loss, lr, norm, 0, ranks=[mine], **speed)
        self.metrics.log(record.to_dict())
        result.record(loss)
        self.console.print(record.line(self.cfg.train.steps))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.model(x.to(self.device), y.to(self.device)).float() for x, y in self.val]
        self.model.train()
        return torch.stack(losses).mean().item()


def run(cfg: Config, cfg_node: DictConfig, run_dir: Path) -> None:
    from trainer.analysis.formulas import shape_flops_per_token
    from trainer.data.setup import build_streams, prepare_data
    from trainer.model import GPT, DenseLayers
    from trainer.parallel.apply import model_shape
    from trainer.runtime.engine import resolve_device
    from trainer.runtime.hardware import peak_flops
    from trainer.training.output import Console, MetricsLog
    from trainer.training.tracking import start_run

    plan = validate(_one_process(cfg), 1)
    stream, val = build_streams(cfg, plan, prepare_data(cfg), 0, 1)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # the trainer's seed on its first rank (dropout masks)
    shape = model_shape(cfg)
    model = GPT(shape, DenseLayers(), seed=cfg.train.seed).to(device)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node, resolve=True))
    console = Console(True, cfg.train.steps, cfg.logging.progress)
    console.print(f"baseline: plain PyTorch, {model.num_params():,} parameters, 1 process | run dir {run_dir}")
    wandb_run = start_run(cfg.logging.wandb, run_dir, OmegaConf.to_container(cfg_node, resolve=True), run_dir.name)
    metrics = MetricsLog(run_dir, True, wandb_run)
    fpt = shape_flops_per_token(shape)
    throughput = Throughput(fpt, peak_flops(device, cfg.parallel.precision), 1)
    try:
        result = BaselineLoop(cfg, model, stream, val, plan, throughput, metrics, console, device).fit()
    finally:
        console.close()
        metrics.close()
    finish(result, run_dir, True, console, "metrics.jsonl, summary.json, config.yaml")


def _one_process(cfg: Config) -> Config:
    """The same config at tp = pp = 1 without ZeRO: the baseline is always a single process."""
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.zero_stage = 0
    cfg.parallel.sequence_parallel = False
    return cfg
