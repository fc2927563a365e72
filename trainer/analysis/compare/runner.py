"""Compare the parallel layouts for real: ``python -m trainer.compare [compare.*=...] [model/data/optim overrides]``.

For one model, data set and world size it trains every valid layout -- a plain-PyTorch baseline on one
process (``trainer.baseline``), the trainer on one rank, DP, ZeRO-1/2/3, TP, SP, PP and hybrids -- each as
its own launch of the real entry point (``deepspeed --num_gpus N --module trainer.train ...``), warm-up
steps first, then measured steps, and writes a report beside the analytic model (``trainer.analysis.compare.report``):

    <compare.out>/runs/<layout>/      each run's directory (metrics.jsonl, config.yaml, ds_config.json, log)
    <compare.out>/report.md, results.csv, *.png

Layouts are names of degrees joined by "-": ``tpN``, ``ppN``, ``dpN``, ``zeroK``, ``sp`` (e.g. ``tp2-dp2-zero1``,
``tp4-sp``); the data-parallel degree is what the world leaves, ``dpN`` only checks it. ``baseline`` and
``single`` run on one process. Words that choose how the data-parallel ranks synchronise (``parallel.dp_sync``):
``ps`` (a parameter server), ``localH`` (local SGD averaging every H steps), ``dilocoH`` (local SGD with DiLoCo's
Nesterov outer step), e.g. ``dp4-ps``, ``dp4-local16``, ``dp4-diloco16``. Words that choose activation recompute
(``parallel.recompute``): ``sel`` (selective), ``full`` or ``fullK`` (full, in runs of K blocks), e.g.
``tp2-sp-full2``. ``auto`` (``auto-memory``: by least
memory) is what ``parallel=auto`` chooses for the world (``trainer.analysis.planner.auto``), the choice made here and
in its run alike. A layout the
world size cannot hold is skipped with the config error that ``trainer.config.validate.validate`` gives for it; a
run that fails is reported with its last error line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.analysis.planner.auto import resolve_parallel
from trainer.config import cli
from trainer.config.rundir import launch_id
from trainer.config.schema import OBJECTIVES, BadInput, BatchPlan, Config, ConfigError
from trainer.config.validate import parallel_overrides, validate
from trainer.runtime.env import free_port

GROUPS = ("model", "data", "optim")  # composed by conf/compare.yaml and passed on to every run
_TOKEN = re.compile(r"^(tp|pp|dp|zero|local|diloco|full)(\d+)$|^(sp|ps|sel|full)$")


@dataclass(frozen=True)
class CompareLayout:
    name: str
    ranks: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sp: bool = False
    dp_asked: int | None = None  # "dpN" in the name: checked against what the world leaves
    baseline: bool = False  # plain PyTorch (trainer.baseline) instead of the trainer
    dp_sync: str = "allreduce"  # parallel.dp_sync
    sync_interval: int = 1  # parallel.sync_interval (local_sgd)
    outer_optimizer: str = "none"  # parallel.outer_optimizer (local_sgd)
    recompute: str = "none"  # parallel.recompute
    checkpoint_every: int = 0  # parallel.activation_checkpoint_interval (full recompute's runs; 0: the default)
    auto: bool = False  # parallel=auto: the planner's choice
    objective: str = "throughput"  # parallel.objective of an auto layout ("auto-memory")

    @property
    def dp(self) -> int:
        return max(self.ranks // (self.tp * self.pp), 1)

    def overrides(self) -> list[str]:
        if self.auto:  # the degrees are the planner's choice (check() fills them in); giving them would contradict it
            return parallel_overrides(auto=True, objective=self.objective)
        degrees = {"tp": self.tp, "pp": self.pp, "zero_stage": self.zero, "sequence_parallel": self.sp}
        sync = {"dp_sync": self.dp_sync, "sync_interval": self.sync_interval, "outer_optimizer": self.outer_optimizer}
        recompute = {"recompute": self.recompute, "activation_checkpoint_interval": self.checkpoint_every}
        return parallel_overrides(**degrees, **sync, **recompute)


def parse_layout(name: str, world: int) -> CompareLayout:
    """A layout name -> its degrees; unknown words are bad input (exit 2)."""
    if name in ("baseline", "single"):
        return CompareLayout(name, 1, baseline=name == "baseline")
    if name == "auto" or name.startswith("auto-"):
        objective = name.removeprefix("auto").removeprefix("-") or OBJECTIVES[0]
        if objective not in OBJECTIVES:
            raise BadInput(
                f"compare.layouts: unknown layout {name!r}; auto chooses by {', '.join(OBJECTIVES)}: "
                + ", ".join(f"auto-{o}" for o in OBJECTIVES)
            )
        return CompareLayout(name, world, auto=True, objective=objective)
    degrees: dict[str, int] = {}
    for token in name.split("-"):
        match = _TOKEN.match(token)
        if not match:
            raise BadInput(
                f"compare.layouts: unknown layout {name!r} (word {token!r}); use baseline, single, auto, or tpN, ppN, "
                "dpN, zeroK, sp, ps, localH, dilocoH, sel, full and fullK joined by '-', e.g. tp2-dp2-zero1"
            )
        degrees[match.group(1) or match.group(3)] = int(match.group(2) or 1)
    interval = degrees.get("local", degrees.get("diloco", 1))
    scheme = "parameter_server" if "ps" in degrees else "local_sgd" if {"local", "diloco"} & set(degrees) else None
    return CompareLayout(
        name,
        world,
        tp=degrees.get("tp", 1),
        pp=degrees.get("pp", 1),
        zero=degrees.get("zero", 0),
        sp="sp" in degrees,
        dp_asked=degrees.get("dp"),
        dp_sync=scheme or "allreduce",
        sync_interval=interval,
        outer_optimizer="nesterov" if "diloco" in degrees else "none",
        recompute="full" if "full" in degrees else "selective" if "sel" in degrees else "none",
        checkpoint_every=degrees.get("full", 0),
    )


def auto_layouts(world: int) -> list[str]:
    """Every family at this world size, pure layouts over the whole world, then the 4-rank hybrids."""
    w = world
    pure = [f"dp{w}", f"zero1-dp{w}", f"zero2-dp{w}", f"zero3-dp{w}", f"tp{w}", f"tp{w}-sp", f"pp{w}"]
    return ["baseline", "single", *pure, "tp2-pp2", "tp2-dp2-zero1", "pp2-dp2"]


@dataclass(frozen=True)
class Settings:
    """What every run of one comparison shares."""

    world: int
    warmup_steps: int
    steps: int
    micro_batch: int
    global_batch: int
    eval_batches: int
    timeout_s: int
    wandb_mode: str
    out: Path
    passthrough: tuple[str, ...]  # model/data/optim overrides from the command line, group choices first
    reuse: bool = False  # rebuild the report from the runs already in ``out`` (no training)

    @property
    def group(self) -> str:
        return f"compare-{self.out.name}"

    def run_overrides(self, layout: CompareLayout) -> list[str]:
        return [
            *self.passthrough,
            f"parallel.micro_batch={self.micro_batch}",
            f"parallel.global_batch={self.global_batch}",
            f"train.steps={self.warmup_steps + self.steps}",
            "train.log_interval=1",
            "train.eval_interval=0",
            f"train.eval_batches={self.eval_batches}",
            "train.save_interval=-1",
            f"logging.wandb.mode={self.wandb_mode}",
            f"logging.wandb.group={self.group}",
            f"logging.wandb.name={layout.name}",
            "logging.progress=false",
            *([] if layout.baseline else layout.overrides()),
        ]


@dataclass
class Outcome:
    """One layout of a comparison: skipped (with the reason), failed (with the reason) or ok."""

    layout: CompareLayout
    status: str  # ok | failed | skipped
    reason: str = ""
    run_dir: Path | None = None
    seconds: float = 0.0
    wandb_id: str = ""
    cfg: Config | None = None
    plan: BatchPlan | None = None
    extra: dict = field(default_factory=dict)


def compose(overrides: list[str]) -> Config:
    """The trainer's typed config for these overrides, as ``trainer.train`` composes it."""
    return cli.compose(overrides)


def check(layout: CompareLayout, settings: Settings) -> Outcome:
    """Compose and validate the layout's config at its world size; a refusal is a skip with its reason."""
    if layout.dp_asked is not None and layout.tp * layout.pp * layout.dp_asked != layout.ranks:
        need = layout.tp * layout.pp * layout.dp_asked
        reason = f"tp{layout.tp}·pp{layout.pp}·dp{layout.dp_asked} needs {need} ranks; the world is {layout.ranks}"
        return Outcome(layout, "skipped", reason)
    cfg = compose(settings.run_overrides(layout))
    try:
        cfg = resolve_parallel(cfg, layout.ranks)  # as its run will: the same inputs and the same measurement
        plan = validate(cfg, layout.ranks)
    except ConfigError as err:
        return Outcome(layout, "skipped", f"config error: {err}", cfg=cfg)
    if layout.auto:
        p = cfg.parallel
        layout = replace(layout, tp=p.tp, pp=p.pp, zero=p.zero_stage, sp=p.sequence_parallel, recompute=p.recompute)
    return Outcome(layout, "pending", cfg=cfg, plan=plan)


def command(layout: CompareLayout, settings: Settings, run_dir: Path) -> list[str]:
    args = [*settings.run_overrides(layout), f"hydra.run.dir={run_dir}"]
    python = sys.executable
    if layout.baseline:
        return [python, "-m", "trainer.baseline", *args]
    if layout.ranks == 1:
        return [python, "-m", "trainer.train", *args]
    launcher = str(Path(python).parent / "deepspeed")
    port = str(free_port())
    ranks = str(layout.ranks)
    return [launcher, "--num_gpus", ranks, "--no_local_rank", "--master_port", port, "--module", "trainer.train", *args]


def run(outcome: Outcome, settings: Settings) -> Outcome:
    """Train one layout in a subprocess (its own process group, killed whole on timeout)."""
    layout = outcome.layout
    run_dir = settings.out / "runs" / layout.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command(layout, settings, run_dir),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    outcome.run_dir, outcome.seconds = run_dir, time.perf_counter() - started
    outcome.wandb_id = _wandb_id(run_dir)
    if code is None:
        outcome.status, outcome.reason = "failed", f"timed out after {settings.timeout_s} s (compare.timeout_s)"
    elif code != 0 or not (run_dir / "metrics.jsonl").is_file():
        outcome.status, outcome.reason = "failed", _last_error(log.read_text(errors="replace"), code)
    else:
        outcome.status = "ok"
    return outcome


def reuse(outcome: Outcome, settings: Settings) -> Outcome:
    """compare.reuse=true: report a run already in compare.out instead of training it again."""
    run_dir = settings.out / "runs" / outcome.layout.name
    if not (run_dir / "metrics.jsonl").is_file():
        return outcome
    outcome.run_dir, outcome.wandb_id = run_dir, _wandb_id(run_dir)
    log = run_dir / "run.log"
    outcome.status = "ok" if (run_dir / "summary.json").is_file() else "failed"
    if outcome.status == "failed":
        outcome.reason = _last_error(log.read_text(errors="replace") if log.is_file() else "", None)
    return outcome


def _child_env() -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # Every run names its directory itself (hydra.run.dir); the id makes an auto row's ranks read the
    # cpu-local measurement that check() made, so they choose what the report predicts.
    env["TRAINER_LAUNCH_ID"] = launch_id()
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _last_error(text: str, code: int | None) -> str:
    """The line that says why: a config error, else the first exception line (the rank that failed
    first; its peers then report lost connections), else the exit code."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("config error:")]
    errors += [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return errors[0][:300] if errors else f"exit code {code}"


def _wandb_id(run_dir: Path) -> str:
    runs = sorted(run_dir.glob("wandb/*run-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else ""


def settings_from(cfg_node: DictConfig) -> tuple[Settings, list[CompareLayout]]:
    """The comparison's settings and layouts from the composed config and the command line."""
    c = cfg_node.compare
    for key in ("world", "steps", "micro_batch", "global_batch", "eval_batches", "timeout_s"):
        _whole(c, key, 1)
    _whole(c, "warmup_steps", 0)
    hc = HydraConfig.get()
    choices = [f"{g}={hc.runtime.choices[g]}" for g in GROUPS]
    user = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in GROUPS]
    passthrough = tuple(choices + [o for o in user if not o.lstrip("+~").startswith(("compare.", "hydra."))])
    settings = Settings(
        int(c.world),
        int(c.warmup_steps),
        int(c.steps),
        int(c.micro_batch),
        int(c.global_batch),
        int(c.eval_batches),
        int(c.timeout_s),
        str(c.wandb_mode),
        Path(hc.runtime.output_dir),
        passthrough,
        bool(c.reuse),
    )
    names = auto_layouts(settings.world) if c.layouts == "auto" else list(c.layouts)
    if not names:
        raise ConfigError("compare.layouts", [], "name at least one layout, or auto")
    return settings, [parse_layout(str(n), settings.world) for n in names]


def _whole(section: DictConfig, key: str, least: int) -> None:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"compare.{key}", value, f"must be a whole number >= {least}")


def compare(settings: Settings, layouts: list[CompareLayout]) -> list[Outcome]:
    outcomes = []
    for layout in layouts:
        outcome = check(layout, settings)
        if outcome.status == "pending" and settings.reuse:
            outcome = reuse(outcome, settings)
        if outcome.status == "pending":
            print(f"[{layout.name}] training on {layout.ranks} rank(s) ...", flush=True)
            outcome = run(outcome, settings)
        note = outcome.reason or f"{outcome.seconds:.0f} s"
        print(f"[{layout.name}] {outcome.status}: {note}", flush=True)
        outcomes.append(outcome)
    return outcomes
