"""What ``python -m trainer.plan`` does: check a plan's config, predict memory and speed of every parallel
layout of a model on a cluster and recommend one, or calibrate efficiencies to a comparison report
(docs/planner.md).

    python -m trainer.plan model=gpt3-175b cluster=dgx-a100 cluster.nodes=128 parallel.global_batch=1536
    python -m trainer.plan model=gpt2-small plan.out=plan.json          # this machine (cluster=cpu-local)
    python -m trainer.plan model=gpt-tiny plan.calibrate=REPORT_DIR     # fit to a trainer.compare report
    python -m trainer.plan model=gpt3-175b cluster=dgx-a100 cluster.nodes=128 parallel.global_batch=1536 \
        parallel.tp=8 parallel.pp=16                                     # ... and how tp8·pp16 ranks among them

Bad input ends like the trainer's: one line naming the key and the fix, exit code 2 (trainer.config.cli).
"""

from __future__ import annotations

from trainer.analysis.planner.config import PlanConfig, global_batch, pins, precision, validate_plan
from trainer.config.cli import check_command_line, compose
from trainer.config.schema import ConfigError


def register() -> None:
    """Make the plan's typed schema known to Hydra (idempotent; before composing ``conf/plan.yaml``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def compose_plan(overrides: list[str]) -> PlanConfig:
    """The typed plan config for a command line."""
    register()
    return compose(overrides, config_name="plan")


def check(cfg: PlanConfig) -> None:
    """validate_plan, then the global batch against the layouts this cluster allows (enumeration is cheap)."""
    from trainer.analysis.planner.cluster import local_ranks
    from trainer.analysis.planner.layouts import dp_multiple, enumerate_layouts, pin_refusal
    from trainer.analysis.planner.stages import partition_method
    from trainer.model.shape import ModelShape

    validate_plan(cfg)
    shape, batch = ModelShape.from_config(cfg.model), global_batch(cfg)
    per_node = local_ranks(cfg.cluster)
    world = cfg.cluster.nodes * per_node
    method = partition_method(cfg.cluster.engine, cfg.parallel.pipeline_partition)
    found = enumerate_layouts(shape, world, per_node, batch, method)
    if not found.layouts:
        key = "parallel.global_batch" if cfg.parallel.global_batch is not None else "train.global_batch"
        smallest = dp_multiple(shape, world, per_node, method)
        raise ConfigError(
            key,
            batch,
            f"no data-parallel degree of {world} ranks divides it; use a multiple of {smallest} (dp = ranks / (tp·pp))",
        )
    refusal = pin_refusal(found, pins(cfg), world)
    if refusal:
        key, why = refusal
        raise ConfigError(f"parallel.{key}", getattr(cfg.parallel, key), why)
    if cfg.plan.calibrate:
        from pathlib import Path

        if not (Path(cfg.plan.calibrate) / "results.csv").is_file():
            raise ConfigError(
                "plan.calibrate", cfg.plan.calibrate, "no results.csv there; give a trainer.compare report directory"
            )


def preflight(argv: list[str]) -> None:
    """Exit with code 2 and one line on stderr if the command line is not a plan that can run."""
    register()
    check_command_line(argv, "plan", check)


def model_overrides() -> list[str]:
    """The model as the user named it, for the trainer's command line."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return [f"model={hc.runtime.choices['model']}"] + [o for o in hc.overrides.task if o.startswith("model.")]


def run(cfg: PlanConfig) -> None:
    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.predict import make_plan
    from trainer.analysis.planner.report import console, print_plan, write_json
    from trainer.model.shape import ModelShape

    check(cfg)
    if cfg.plan.calibrate:
        return calibrate(cfg)
    shape, partition = ModelShape.from_config(cfg.model), cfg.parallel.pipeline_partition
    v = cfg.parallel.virtual_stages
    plan = make_plan(shape, cluster_spec(cfg.cluster), global_batch(cfg), precision(cfg), partition, v)
    print_plan(plan, cfg.plan.top, cfg.plan.rejected, model_overrides(), pins(cfg))
    if cfg.plan.out:
        write_json(plan, cfg.plan.out, pins(cfg))
        console().print(f"\nwrote {len(plan.predictions)} layouts to {cfg.plan.out}")


def calibrate(cfg: PlanConfig) -> None:
    from trainer.analysis.planner.calibrate import fit, print_fit, read_results
    from trainer.analysis.planner.cluster import resolve, spec_for_world
    from trainer.analysis.planner.report import console
    from trainer.model.shape import ModelShape

    measured = read_results(cfg.plan.calibrate, global_batch(cfg), precision(cfg))
    resolved, notes = resolve(cfg.cluster)
    out = console()
    for line in notes:
        out.print(line)
    result = fit(ModelShape.from_config(cfg.model), lambda world: spec_for_world(resolved, world, notes), measured)
    print_fit(result, out)
