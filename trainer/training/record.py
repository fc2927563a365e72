"""What a logged step writes: one typed record per step for metrics.jsonl, wandb and the console, shared by
the trainer's loop, the plain-PyTorch baseline and the comparison report that reads them back.

    StepRecord   the step on rank 0's view: loss, learning rate, speed, MFU, rank 0's collectives
    RankRecord   one rank's measurements (gathered from every rank into StepRecord.ranks)
    EvalRecord   a validation pass
    SampleRecord greedy continuations of train.sample_prompts after a validation pass

The README's list of metrics.jsonl fields is checked against these classes by a test.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.runtime.hardware import current_rss_bytes, peak_memory_bytes
from trainer.training.instruments import ActivationMeter, TensorCensus, cpu_seconds


@dataclass(frozen=True)
class Throughput:
    """What turns tokens/s into achieved FLOP/s and MFU."""

    flops_per_token: float  # model FLOPs per trained token (trainer.analysis.formulas.flops_per_token)
    peak_flops_per_rank: float  # the device's peak FLOP/s (trainer.runtime.hardware.peak_flops)
    world_size: int


@dataclass
class Comm:
    """One family's collectives of a step on one rank (tensor-parallel layers, or DeepSpeed's engine)."""

    by_kind: dict[str, dict] = field(default_factory=dict)  # kind -> count, bytes, seconds (and wire bytes)
    bytes: float = 0  # full-buffer bytes, summed over kinds
    wire_bytes: float = 0  # what this rank sends on a ring (trainer.analysis.formulas.wire_bytes)
    seconds: float = 0

    def fields(self, prefix: str) -> dict[str, Any]:
        """As metrics.jsonl spells them: <prefix>, <prefix>_bytes, <prefix>_wire_bytes, <prefix>_s."""
        return {
            prefix: self.by_kind,
            f"{prefix}_bytes": self.bytes,
            f"{prefix}_wire_bytes": self.wire_bytes,
            f"{prefix}_s": self.seconds,
        }


# The collectives of a step by who issued them: the tensor-parallel layers, DeepSpeed's engine, and the
# data-parallel synchronisation of parallel.dp_sync when it is not DeepSpeed's all-reduce.
COMM_FAMILIES = ("tp_comm", "ds_comm", "dp_comm")


def _comm_fields(record) -> dict[str, Any]:
    return {k: v for family in COMM_FAMILIES for k, v in getattr(record, family).fields(family).items()}


@dataclass
class RankRecord:
    rank: int
    coords: dict[str, int]  # tp, pp, dp
    positions: list[int]  # [first, stop) of the pipeline positions this rank runs
    shard_params: int  # parameters this rank holds (ZeRO-3: its partition)
    peak_mem_bytes: int  # CUDA allocator high-water mark, or peak RSS on CPU
    rss_bytes: int  # resident memory now
    cpu_percent: float  # 100 = one core busy for the whole step
    mem: dict[str, int]  # tensor bytes by kind (trainer.training.instruments.KINDS) and saved activations
    time: dict[str, float]  # seconds per phase (trainer.training.instruments.PhaseClock)
    tp_comm: Comm = field(default_factory=Comm)
    ds_comm: Comm = field(default_factory=Comm)
    dp_comm: Comm = field(default_factory=Comm)  # parallel.dp_sync's own messages (trainer.parallel.dp_sync)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in COMM_FAMILIES}
        return {**out, **_comm_fields(self)}


@dataclass
class StepRecord:
    step: int  # optimizer steps done, 1-based
    loss: float  # mean over the global batch
    lr: float  # the learning rate this step used
    grad_norm: float | None  # before clipping
    skipped_steps: int  # non-finite steps so far (not applied)
    step_time_s: float
    tokens_per_s: float
    window_tokens_per_s: float  # since the previous logged step, whose steps ran unmeasured
    window_tokens_per_cpu_s: float  # the same per CPU second of this process
    tflops_per_rank: float
    mfu: float  # achieved over the device's peak FLOP/s
    peak_mem_mb: float  # rank 0's peak memory (MiB)
    ranks: list[RankRecord]
    tp_comm: Comm = field(default_factory=Comm)  # rank 0's
    ds_comm: Comm = field(default_factory=Comm)  # rank 0's
    pipe: dict[str, Any] = field(default_factory=dict)  # pipe_* bubble fields at pp > 1
    dp_comm: Comm = field(default_factory=Comm)  # rank 0's
    loss_scale: float | None = None  # fp16: the dynamic loss scale after this step (halved by an overflow)

    def to_dict(self) -> dict[str, Any]:
        skip = ("ranks", *COMM_FAMILIES, "pipe")
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        out.update(_comm_fields(self), **self.pipe)
        out["ranks"] = [r.to_dict() for r in self.ranks]
        return out

    def line(self, steps: int) -> str:
        """The console line."""
        norm = f"{self.grad_norm:.3f}" if self.grad_norm is not None else "n/a"
        return (
            f"step {self.step:>6}/{steps}  loss {self.loss:.4f}  lr {self.lr:.2e}  grad_norm {norm}  "
            f"{self.tokens_per_s:,.0f} tok/s  mfu {self.mfu:.1%}"
        )


@dataclass
class EvalRecord:
    step: int
    val_loss: float
    val_ppl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampleRecord:
    """Greedy continuations of ``train.sample_prompts`` after a validation pass (trainer.training.samples)."""

    step: int
    samples: list[dict[str, str]]  # {"prompt", "completion"} per prompt, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [f"step {self.step:>6}  sample {s['prompt']!r} -> {s['completion']!r}" for s in self.samples]


@dataclass
class AutoRecord:
    """``parallel=auto``'s choice and runner-up with the planner's predictions (step 0, before training), to read
    beside what the run measures."""

    step: int
    auto_objective: str
    auto_cluster: str
    auto_chosen: dict[str, Any]  # PlannedLayout: name, memory_gb, tokens_per_s
    auto_runner_up: dict[str, Any]

    @classmethod
    def of(cls, parallel) -> AutoRecord:
        return cls(0, parallel.objective, parallel.cluster, asdict(parallel.chosen), asdict(parallel.runner_up))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckpointRecord:
    """A checkpoint written or read, measured on every rank (lists in rank order)."""

    step: int
    checkpoint_io: str  # save | load
    checkpoint_s: list[float]
    checkpoint_rss_before_bytes: list[int]  # resident memory just before
    checkpoint_peak_rss_bytes: list[int]  # the peak inside (NaN where it cannot be reset)
    checkpoint_state_bytes: list[int]  # this rank's file of the sharded state

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        mb = 2**20
        growth = max(p - b for p, b in zip(self.checkpoint_peak_rss_bytes, self.checkpoint_rss_before_bytes))
        return (
            f"checkpoint {self.checkpoint_io} step {self.step}: {max(self.checkpoint_s):.1f} s, "
            f"{max(self.checkpoint_state_bytes) / mb:,.0f} MB sharded state per rank (largest), "
            f"peak RSS {max(self.checkpoint_peak_rss_bytes) / mb:,.0f} MB (+{growth / mb:,.0f} MB over before)"
        )


# Bubble fields of a pipelined step (StepRecord.pipe): per stage, beside the 1F1B prediction.
PIPE_FIELDS = ("pipe_idle_fraction", "pipe_idle_fraction_analytic", "pipe_bubble_ratio", "pipe_bubble_ratio_analytic")


def jsonl_fields() -> dict[str, list[str]]:
    """The keys metrics.jsonl records carry, per record kind (what the README lists)."""
    comm = [f"{p}{suffix}" for p in COMM_FAMILIES for suffix in ("", "_bytes", "_wire_bytes", "_s")]
    plain = lambda cls, skip: [f for f in cls.__dataclass_fields__ if f not in skip]  # noqa: E731
    return {
        "step": plain(StepRecord, (*COMM_FAMILIES, "pipe")) + comm + list(PIPE_FIELDS) + ["time_s"],
        "rank": plain(RankRecord, COMM_FAMILIES) + comm,
        "eval": plain(EvalRecord, ()),
        "samples": plain(SampleRecord, ()) + ["prompt", "completion"],
        "checkpoint": plain(CheckpointRecord, ()),
        "auto": plain(AutoRecord, ()),
    }


def is_logged(step: int, start_step: int, log_interval: int, steps: int) -> bool:
    """Whether 0-based ``step`` is measured and logged: every log_interval-th, the first of a run (also
    after a resume) and the last."""
    return (step + 1) % log_interval == 0 or step == start_step or step + 1 == steps


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


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
        return None if self.val_loss is None else perplexity(self.val_loss)


@dataclass
class Window:
    """The steps since the last logged one: mostly unmeasured, so their throughput is the loop's own."""

    start: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=cpu_seconds)  # this process's CPU seconds at the start
    steps: int = 0


def speed_fields(tokens: int, step_s: float, window: Window, now: float, tp: Throughput, device) -> dict:
    """StepRecord's speed fields: one step (``tokens`` trained in ``step_s``), the ``window`` of steps since
    the last logged one, achieved FLOP/s and MFU, and this rank's peak memory."""
    tokens_per_s = tokens / step_s
    flops_per_rank = tokens_per_s * tp.flops_per_token / tp.world_size
    return {
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "window_tokens_per_s": window.steps * tokens / (now - window.start),
        # per CPU second of this process: what other processes on a shared machine change least
        "window_tokens_per_cpu_s": window.steps * tokens / max(cpu_seconds() - window.cpu, 1e-9),
        "tflops_per_rank": flops_per_rank / 1e12,
        "mfu": flops_per_rank / tp.peak_flops_per_rank,
        "peak_mem_mb": peak_memory_bytes(device) / 2**20,
    }


def rank_fields(module, device, census: TensorCensus, activations: ActivationMeter, cpu_s, step_s) -> dict:
    """RankRecord's memory and CPU fields: memory by kind, peak and current memory, CPU use, shard size."""
    return {
        "shard_params": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
        "peak_mem_bytes": peak_memory_bytes(device),
        "rss_bytes": current_rss_bytes(),
        "cpu_percent": round(100 * cpu_s / step_s, 1),
        "mem": {**census.peak, "activations": activations.peak},
    }


def finish(result: FitResult, run_dir: Path, is_writer: bool, console, files: str) -> None:
    """summary.json (first and last loss, validation loss and perplexity) and the closing console lines."""
    summary = {"first_loss": result.first_loss, "last_loss": result.last_loss, "val_loss": result.val_loss}
    summary.update(val_ppl=result.val_ppl, steps=result.steps, run_dir=str(run_dir))
    if is_writer:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"done: loss {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}, val_loss {_fmt(result.val_loss)}, "
        f"val_ppl {_fmt(result.val_ppl, 2)}\nresults in {run_dir} ({files})"
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
