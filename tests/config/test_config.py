"""Config composition, overrides, validation and the generated DeepSpeed config."""

from __future__ import annotations

import pytest

from conftest import ROOT, compose_config
from trainer.config.validate import validate
from trainer.runtime.ds_config import ds_config

GROUPS = {g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml")) for g in ("model", "parallel", "data")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if option in ("files", "shakespeare"):  # corpora outside the repository: point at a file that exists
        overrides.append(f"data.paths=[{ROOT / 'pyproject.toml'}]")
    if option == "megatron":  # Megatron .bin/.idx files and their tokenizer: a small data set, any file
        from trainer.data.indexed import IndexedWriter

        with IndexedWriter(tmp_path / "corpus", "uint16") as writer:
            writer.add_document([1, 2, 3])
        overrides += [
            f"data.megatron.train_prefix={tmp_path}/corpus",
            f"data.tokenizer.source={ROOT / 'pyproject.toml'}",
        ]
    if option == "auto":  # resolved into explicit degrees first, as at launch; a named cluster (no measuring)
        overrides.append("parallel.cluster=h100-sxm")
    cfg, _ = compose_config(overrides)
    world = 2 * cfg.parallel.tp * cfg.parallel.pp  # room for data parallelism beside the model-parallel degrees
    if cfg.parallel.auto:
        from trainer.analysis.planner.auto import resolve_parallel

        world = 8  # one node of the cluster
        cfg = resolve_parallel(cfg, world)
    plan = validate(cfg, world_size=world)
    assert getattr(cfg, group).name == option
    assert plan.global_batch == plan.micro_batch * plan.grad_accum * plan.dp


def test_command_line_overrides_reach_the_typed_config():
    cfg, _ = compose_config(["model=gpt2-small", "parallel.zero_stage=2", "optim.lr=3e-4", "train.steps=7"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (12, 768, 50257)
    assert cfg.parallel.zero_stage == 2 and cfg.optim.lr == 3e-4 and cfg.train.steps == 7
    assert cfg.data.tokenizer.vocab_size == 50257  # interpolated from the model


def test_experiment_overrides_groups_and_fields():
    cfg, _ = compose_config(["experiment=quickstart"])
    assert cfg.parallel.zero_stage == 1 and cfg.model.seq_len == 128 and cfg.train.steps == 200


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_is_derived_from_the_config(stage):
    cfg, _ = compose_config(
        [
            f"parallel.zero_stage={stage}",
            "parallel.micro_batch=2",
            "parallel.global_batch=16",
            "parallel.precision=bf16",
            "optim.grad_clip=0.5",
        ]
    )
    plan = validate(cfg, world_size=4)
    ds = ds_config(cfg, plan)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        2,
        2,
    )
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from trainer.training.schedule import lr_at

    cfg, _ = compose_config(["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=10"])
    lrs = [lr_at(s, cfg.optim, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg.optim, 100) == pytest.approx(1e-4)
