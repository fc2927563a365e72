"""``parallel=auto``: the planner chooses the layout a run trains, for the launched world size, the model, the
batch and a cluster description (``parallel.cluster``, a ``conf/cluster`` option).

``resolve_parallel`` is the one place where ``auto`` becomes explicit degrees: the entry point calls it before
``validate``, so everything after it (validation, the memory check, the mesh, the engine) sees an ordinary layout.

Every rank must train the same layout, and there is no process group yet to agree through. The choice is a pure
function of the config, the world size and the cluster's numbers, with ties broken by the planner's fixed
enumeration order, so ranks that see the same numbers choose the same layout. A described cluster's numbers are
the same everywhere; ``cpu-local``'s are measured, and two measurements differ. cpu-local is this one machine, so
its ranks share one measurement through a file named by the launch id (which names the run directory, so every
rank of a launch already agrees on it, and a resumed run with the same ``TRAINER_LAUNCH_ID`` chooses again what it
chose before): the first rank to take the file's lock measures, the others read what it wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from trainer.analysis.planner.config import ClusterConfig, validate_cluster
from trainer.config.schema import Config, ConfigError, ParallelConfig, PlannedLayout
from trainer.config.validate import validate_auto_degrees, validate_auto_keys

GB = 1e9


def resolve_parallel(cfg: Config, world: int) -> Config:
    """``cfg`` unchanged unless ``parallel.auto``; else with the planner's choice as its explicit degrees and the
    choice and its runner-up recorded in ``parallel.chosen`` / ``parallel.runner_up``."""
    p = cfg.parallel
    validate_auto_keys(p)
    if not p.auto or p.chosen.name:  # chosen already: preflight resolved it in this process
        return cfg
    validate_auto_degrees(p)
    best, second = choose(cfg, world)
    layout = best.layout
    degrees = {
        "tp": layout.tp,
        "pp": layout.pp,
        "zero_stage": layout.zero_stage,
        "micro_batch": layout.micro_batch,
        "recompute": layout.recompute,
        "sequence_parallel": layout.sequence_parallel,
    }
    return replace(cfg, parallel=replace(p, **degrees, chosen=planned(best), runner_up=planned(second)))


def choose(cfg: Config, world: int):
    """(best, runner-up or None) among the fitting predictions of the planner for this launch."""
    from trainer.analysis.planner.predict import make_plan
    from trainer.model.shape import ModelShape

    p = cfg.parallel
    cluster = cluster_for(p.cluster, world, cfg.train.device)
    shape = ModelShape.from_config(cfg.model)
    plan = make_plan(shape, cluster, p.global_batch, p.precision, p.pipeline_partition, fused_loss=cfg.speed.fused_loss)
    if not plan.predictions:
        from trainer.analysis.planner.layouts import dp_multiple
        from trainer.analysis.planner.stages import partition_method

        method = partition_method(cluster.engine, p.pipeline_partition)
        multiple = dp_multiple(shape, world, cluster.gpus_per_node, method)
        fix = f"no layout of {world} ranks divides it; use a multiple of {multiple} (dp = ranks / (tp·pp))"
        raise ConfigError("parallel.global_batch", p.global_batch, fix)
    # The planner's ranking: fastest first, then the smaller footprint, then its fixed enumeration order.
    ranked = [q for q in plan.ranked if p.micro_batch in (0, q.layout.micro_batch)]
    if not ranked:
        raise nothing_fits(plan, p, world, lambda ranks: fitting_world(cfg, shape, ranks))
    if p.objective == "memory":
        ranked.sort(key=lambda q: q.memory.total)  # stable: of equal footprints the faster stays first
    return ranked[0], ranked[1] if len(ranked) > 1 else None


def layout_name(layout) -> str:
    t = layout
    sp = "-sp" if t.sequence_parallel else ""
    return f"tp{t.tp}-pp{t.pp}-dp{t.dp}-zero{t.zero_stage}-mb{t.micro_batch}-{t.recompute}{sp}"


def planned(prediction) -> PlannedLayout:
    if prediction is None:
        return PlannedLayout()
    memory, speed = prediction.memory.total / GB, prediction.tokens_per_s
    return PlannedLayout(layout_name(prediction.layout), round(memory, 4), round(speed, 1))


def nothing_fits(plan, p: ParallelConfig, world: int, more_ranks) -> ConfigError:
    """One line: the smallest footprint found and what would hold it (``more_ranks(world)``: the smallest larger
    world, and its fastest layout, that fits)."""
    fitting = [q for q in plan.predictions if q.fits]
    if fitting:  # only the micro-batch the user fixed is too large
        least = min(fitting, key=lambda q: q.memory.total).layout.micro_batch
        fix = f"no layout of {world} ranks that fits takes it at global_batch={p.global_batch}; use {least} or 0 (auto)"
        return ConfigError("parallel.micro_batch", p.micro_batch, fix)
    smallest = min(plan.predictions, key=lambda q: q.memory.total)
    need, have, c = smallest.memory.total / GB, plan.cluster.mem_bytes / GB, plan.cluster
    if c.pooled:  # more ranks on one machine only divide its memory further
        would = f"a machine with {need * world:.1f} GB for {world} ranks, or a smaller model or batch, would fit"
    else:
        found = more_ranks(world)
        ranks = f"{found[0]} ranks ({layout_name(found[1].layout)})" if found else "more ranks"
        would = f"{ranks}, a device with {need:.1f} GB, or a smaller model or batch would fit"
    return ConfigError(
        "parallel.auto",
        True,
        f"no layout fits {world} ranks of {c.name} ({have:.1f} GB per rank): the smallest, "
        f"{layout_name(smallest.layout)}, needs {need:.1f} GB per rank; {would}",
    )


def fitting_world(cfg: Config, shape, world: int, doublings: int = 10):
    """(ranks, its fastest fitting prediction) for the smallest of 2·world, 4·world, ... that fits, or None."""
    from trainer.analysis.planner.predict import make_plan

    p = cfg.parallel
    for k in range(1, doublings + 1):
        ranks = world * 2**k
        cluster = cluster_for(p.cluster, ranks, cfg.train.device)
        plan = make_plan(shape, cluster, p.global_batch, p.precision, p.pipeline_partition)
        if plan.ranked:
            return ranks, plan.ranked[0]
    return None


def cluster_config(name: str) -> ClusterConfig:
    """A ``conf/cluster`` option composed as ``trainer.plan`` composes it."""
    from trainer.analysis.planner.run import compose_plan
    from trainer.config.cli import CONF_DIR

    options = sorted(path.stem for path in (CONF_DIR / "cluster").glob("*.yaml"))
    if name not in options:
        raise ConfigError("parallel.cluster", name, f"no such cluster; choose one of: {', '.join(options)}")
    cluster = compose_plan([f"cluster={name}"]).cluster
    validate_cluster(cluster)
    return cluster


def cluster_for(name: str, world: int, device: str):
    """The cluster's numbers for exactly ``world`` ranks: all on this machine when its ranks share it (cpu-local),
    else whole nodes, or part of one."""
    from trainer.analysis.planner.cluster import cluster_spec

    c = cluster_config(name)
    if c.measure:
        _check_cpu_run(name, device)
        c, notes = measured_once(c)
        return cluster_spec(replace(c, nodes=1, gpus_per_node=world), notes)
    if c.shared:
        return cluster_spec(replace(c, nodes=1, gpus_per_node=world))
    per_node = min(world, c.gpus_per_node)
    if world % per_node:
        fix = f"{world} ranks are not whole nodes of {c.gpus_per_node}; launch a multiple of {c.gpus_per_node}"
        raise ConfigError("parallel.cluster", name, fix)
    return cluster_spec(replace(c, nodes=world // per_node, gpus_per_node=per_node))


def _check_cpu_run(name: str, device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        fix = "measures this machine's CPU, but the run trains on its GPUs; name theirs, e.g. parallel.cluster=h100-sxm"
        raise ConfigError("parallel.cluster", name, fix)


def measured_once(c: ClusterConfig) -> tuple[ClusterConfig, tuple[str, ...]]:
    """This machine's numbers, measured by the first rank of the launch to get here (see the module)."""
    import fcntl

    from trainer.analysis.planner.cluster import resolve

    path = measurement_file(c.name)
    with path.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.is_file():
            saved = json.loads(path.read_text())
            return ClusterConfig(**saved["cluster"]), tuple(saved["notes"])
        measured, notes = resolve(c)
        path.write_text(json.dumps({"cluster": asdict(measured), "notes": list(notes)}))
        return measured, notes


def measurement_file(cluster: str) -> Path:
    """Where the ranks of this launch share the measured numbers of ``cluster`` (a ClusterConfig as JSON)."""
    from trainer.config.rundir import launch_id

    return Path(tempfile.gettempdir()) / f"trainer-{cluster}-{os.getuid()}-{launch_id()}.json"


def describe(p: ParallelConfig, world: int) -> str:
    """What the run prints: the choice and the runner-up with their predictions."""

    def one(layout: PlannedLayout) -> str:
        return f"{layout.name} ({layout.memory_gb:.2f} GB per rank, {layout.tokens_per_s:,.0f} tokens/s predicted)"

    runner_up = one(p.runner_up) if p.runner_up.name else "none (one layout fits)"
    return (
        f"parallel=auto ({p.objective}, cluster {p.cluster}, world {world}): chose {one(p.chosen)}; "
        f"runner-up {runner_up}"
    )
