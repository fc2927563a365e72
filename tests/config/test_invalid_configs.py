"""Bad input fails fast: one line naming the key, exit code 2, no traceback, nothing written.

The table runs through ``trainer.config.cli.preflight`` in-process (what every entry point calls before
Hydra starts); a sample of it runs through the real command line as well.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env
from trainer.config.cli import preflight

# (command-line overrides, world size, the key the message must name)
INVALID = [
    (["model=gpt5"], 1, "model"),
    (["parallel=tp8"], 1, "parallel"),
    (["data=wikipedia"], 1, "data"),
    (["optim=sgd"], 1, "optim"),
    (["experiment=nothing"], 1, "experiment"),
    (["parallel.micro_batch=abc"], 1, "parallel.micro_batch"),
    (["train.steps=1.5"], 1, "train.steps"),
    (["parallel.foo=1"], 1, "parallel.foo"),
    (["model.seq_len=1000000"], 1, "train.memory_check"),  # ~0.4 TB of activations: no machine here fits it
    (["model=gpt3-175b"], 1, "train.memory_check"),  # 2.8 TB of fp32 model states on one rank
    (["+trian.steps=5"], 1, "trian.steps"),  # appended keys are checked too, not silently added
    (["+train.stepz=5"], 1, "train.stepz"),
    (["+unknown.key=1"], 1, "unknown.key"),
    (["+model.n_kv_heads=2"], 1, "model.n_kv_heads"),
    (["model.n_layer=0"], 1, "model.n_layer"),
    (["model.n_embd=-64"], 1, "model.n_embd"),
    (["model.n_head=5"], 1, "model.n_head"),
    (["model.seq_len=0"], 1, "model.seq_len"),
    (["model.vocab_size=0"], 1, "model.vocab_size"),
    (["model.dropout=1.5"], 1, "model.dropout"),
    (["model.mlp=relu"], 1, "model.mlp"),
    (["model.norm=batchnorm"], 1, "model.norm"),
    (["model.position=alibi"], 1, "model.position"),
    (["model.n_kv_head=3"], 1, "model.n_kv_head"),  # 4 query heads do not share 3 key/value heads
    (["model.n_kv_head=0"], 1, "model.n_kv_head"),
    (["model.ffn_hidden=-1"], 1, "model.ffn_hidden"),
    (["model.norm_eps=0"], 1, "model.norm_eps"),
    (["model.rope_theta=-1"], 1, "model.rope_theta"),
    (["model.position=rope", "model.n_embd=260"], 1, "model.position"),  # head size 65 cannot rotate in pairs
    (["model=llama-tiny", "parallel.tp=4"], 4, "parallel.tp"),  # 2 key/value heads do not split in 4
    (["model.ffn_hidden=1001", "parallel.tp=2"], 2, "parallel.tp"),  # the MLP's inner size does not split
    (["parallel.tp=3"], 3, "parallel.tp"),  # 4 heads do not split in 3
    (["parallel.tp=4"], 2, "parallel.tp"),  # more tp ranks than the world
    (["parallel.tp=2"], 3, "parallel.tp"),  # tp does not divide the world
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=255"], 2, "parallel.sequence_parallel"),
    (["parallel.pp=0"], 1, "parallel.pp"),
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
    (["parallel.recompute=partial"], 1, "parallel.recompute"),
    (["parallel.recompute=selective", "parallel.activation_checkpoint_interval=2"], 1, "parallel.recompute"),
    (["parallel.zero_stage=-1"], 1, "parallel.zero_stage"),
    (["parallel.dp_sync=gossip"], 1, "parallel.dp_sync"),
    (["parallel=zero1", "parallel.dp_sync=parameter_server"], 2, "parallel.dp_sync"),  # ZeRO partitions gradients
    (["parallel=pp2", "parallel.dp_sync=local_sgd"], 4, "parallel.dp_sync"),  # the pipeline reduces its own
    (["parallel.dp_sync=local_sgd", "parallel.precision=bf16"], 2, "parallel.dp_sync"),
    (["parallel.dp_sync=local_sgd", "parallel.sync_interval=0"], 2, "parallel.sync_interval"),
    (["parallel.sync_interval=4"], 2, "parallel.sync_interval"),  # only local_sgd reads it
    (["parallel.dp_sync=local_sgd", "parallel.outer_optimizer=adam"], 2, "parallel.outer_optimizer"),
    (["parallel.dp_sync=local_sgd", "parallel.outer_momentum=1"], 2, "parallel.outer_momentum"),
    (["parallel=auto", "parallel.tp=2"], 2, "parallel.tp"),  # auto chooses the degrees: one given contradicts it
    (["parallel=auto", "parallel.zero_stage=3"], 2, "parallel.zero_stage"),
    (["parallel=auto", "parallel.tp=1"], 2, "parallel.tp"),  # named, so meant: contradicts auto at its default too
    (["parallel=auto", "parallel.objective=speed"], 2, "parallel.objective"),
    (["parallel.objective=memory"], 1, "parallel.objective"),  # only parallel=auto reads it
    (["parallel=auto", "parallel.cluster=tpu-v5"], 2, "parallel.cluster"),
    (["parallel=auto", "parallel.cluster=a100-40gb", "model=gpt3-175b"], 8, "parallel.auto"),  # nothing fits
    (["parallel.precision=fp8"], 1, "parallel.precision"),
    (["train.device=cuda"], 1, "train.device"),  # no GPU here
    (["parallel.micro_batch=0"], 1, "parallel.micro_batch"),
    (["parallel.global_batch=6"], 4, "parallel.global_batch"),  # not a multiple of micro 4 x dp 4
    (["parallel.global_batch=-8"], 1, "parallel.global_batch"),
    (["optim.lr=0"], 1, "optim.lr"),
    (["optim.min_lr=1.0"], 1, "optim.min_lr"),
    (["optim.warmup_steps=-1"], 1, "optim.warmup_steps"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay"),
    (["optim.grad_clip=-1"], 1, "optim.grad_clip"),
    (["optim.betas=[0.9,1.5]"], 1, "optim.betas"),
    (["train.steps=0"], 1, "train.steps"),
    (["train.log_interval=0"], 1, "train.log_interval"),
    (["train.eval_interval=-5"], 1, "train.eval_interval"),
    (["train.save_interval=-2"], 1, "train.save_interval"),
    (["train.keep_last=-1"], 1, "train.keep_last"),
    (["train.init_from=/nonexistent/step_3"], 1, "train.init_from"),
    (["train.max_skipped_steps=-1"], 1, "train.max_skipped_steps"),
    (["train.inject_nan_steps=[0]"], 1, "train.inject_nan_steps"),
    (["train.profile_start=-1"], 1, "train.profile_start"),
    (["train.steps=10", "train.profile_start=9", "train.profile_steps=3"], 1, "train.profile_start"),
    (["train.profile_start=2", "train.profile_steps=0"], 1, "train.profile_steps"),
    (["train.profile_start=2", "train.profile_ranks=[0,2]"], 2, "train.profile_ranks"),
    (["train.collective_timeout_s=0"], 1, "train.collective_timeout_s"),
    (["train.device=tpu"], 1, "train.device"),
    (["data.source=web"], 1, "data.source"),
    (["data=files"], 1, "data.paths"),
    (["data=files", "data.paths=[/no/such/corpus]"], 1, "data.paths"),
    (["data=hub-stream", "data.hub_name="], 1, "data.hub_name"),
    (["data.val_fraction=0"], 1, "data.val_fraction"),
    (["data.num_proc=-1"], 1, "data.num_proc"),
    (["data.tokenizer.train_bytes=-1"], 1, "data.tokenizer.train_bytes"),
    (["data.tokenizer.vocab_size=100"], 1, "data.tokenizer.vocab_size"),
    (["data.tokenizer.vocab_size=100000"], 1, "data.tokenizer.vocab_size"),
    (["data.tokenizer.source=/no/such/tokenizer.json"], 1, "data.tokenizer.source"),
    (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode"),
    (["-m", "parallel.zero_stage=1,2,7"], 1, "parallel.zero_stage"),  # one bad value in a sweep
]


@pytest.mark.parametrize("overrides,world,key", INVALID, ids=[" ".join(o) for o, _, _ in INVALID])
def test_invalid_config_is_one_line_naming_the_key(overrides, world, key, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        preflight(overrides)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0] and "Traceback" not in lines[0]


@pytest.mark.parametrize(
    "override,suggested",
    [("+trian.steps=5", "train.steps"), ("trian.steps=5", "train.steps"), ("+model.n_kv_heads=2", "model.n_kv_head")],
)
def test_unknown_key_names_the_closest_valid_one(override, suggested, capsys):
    with pytest.raises(SystemExit):
        preflight([override])
    assert capsys.readouterr().err.strip().endswith(f"no such key; did you mean {suggested}?")


def test_the_table_is_large_enough():
    assert len(INVALID) >= 30


def test_valid_command_line_passes_preflight(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    preflight(["-m", "parallel=tp2-zero1", "parallel.zero_stage=0,1", "model=gpt2-small"])  # returns


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model=gpt5"], "model"),
        (["parallel.micro_batch=abc"], "parallel.micro_batch"),
        (["parallel.zero_stage=9"], "parallel.zero_stage"),
        (["-m", "optim.lr=1e-3,-1"], "optim.lr"),
        (["+trian.steps=5"], "train.steps"),
    ],
)
def test_command_line_exits_2_fast_and_writes_nothing(overrides, key, tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            *overrides,
            f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_refused_before_any_process_group(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("\n\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            "debug=smoke",
            "data=files",
            f"data.paths=[{corpus}]",
            f"data.cache_dir={tmp_path}/cache",
            "data.tokenizer.vocab_size=300",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "data" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher", ["deepspeed", "ranks"])
def test_launched_ranks_say_a_bad_config_once(launcher, tmp_path):
    """Every rank refuses the config, exit code 2; the line is printed once, not once per rank."""
    from conftest import run_train

    proc = run_train(tmp_path / "run", ["model=gpt-tiny", "parallel.pp=3"], ranks=4, launcher=launcher)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert lines == ["config error: parallel.tp=1: tp*pp=3 must divide the world size 4"], proc.stderr


def test_a_line_is_said_once_per_launch_and_node(monkeypatch, tmp_path, capsys):
    """Within one launch (same launcher process, same launch id) a line is printed by the first rank that gives it;
    another line, or another launch, is printed; a process no launcher started always prints."""
    from trainer.config.cli import print_bad_input
    from trainer.config.schema import ConfigError

    monkeypatch.setenv("TRAINER_LAUNCH_ID", f"test-{tmp_path.name}")
    monkeypatch.setenv("LOCAL_RANK", "0")
    memory = ConfigError("parallel.micro_batch", 8, "needs 90 GB on this GPU, 80 free")
    for err in (memory, memory, ConfigError("parallel.tp", 3, "must divide 8"), memory):
        print_bad_input(err)
    monkeypatch.setenv("TRAINER_LAUNCH_ID", f"test-{tmp_path.name}-again")
    print_bad_input(memory)
    monkeypatch.delenv("LOCAL_RANK")
    print_bad_input(memory)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["parallel.micro_batch=8", "parallel.tp=3"] + [
        "parallel.micro_batch=8"
    ] * 2, lines
