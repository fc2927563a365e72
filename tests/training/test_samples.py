"""Samples during training (train.sample_prompts, trainer.training.samples): greedy continuations after
every validation pass, printed, in metrics.jsonl and in wandb as a table; they are the checkpoint's own
greedy continuations and leave training unchanged; layouts where no rank holds the whole model say once
that they skip them; the keys are validated in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config, padded_smoke_overrides, read_metrics, run_layout, run_train
from trainer.checkpoint import store as checkpoint
from trainer.config.cli import preflight
from trainer.data.tokenizer import eot_id, load_tokenizer
from trainer.inference.decode import Sampling, generate
from trainer.inference.load import load
from trainer.training.output import _for_wandb
from trainer.training.samples import skip_reason

PROMPTS = ["ROMEO", "First Citizen:"]
NEW_TOKENS = 8


def _overrides(data_cache, *extra: str) -> list[str]:
    """Dropout on, so a sampling pass that drew random numbers or left the model in eval mode would show."""
    return [
        *padded_smoke_overrides(data_cache),
        "model.dropout=0.1",
        "train.steps=4",
        "train.eval_interval=2",
        "train.save_interval=2",
        *extra,
    ]


SAMPLING = [f"train.sample_prompts=[{PROMPTS[0]},'{PROMPTS[1]}']", f"train.sample_tokens={NEW_TOKENS}"]


def test_samples_in_console_metrics_and_wandb(tmp_path, data_cache):
    run_dir = tmp_path / "sampled"
    proc = run_train(run_dir, _overrides(data_cache, *SAMPLING, "logging.wandb.mode=offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r["samples"] for r in read_metrics(run_dir) if "samples" in r}
    assert sorted(records) == [2, 4]  # after each validation pass
    for step, samples in records.items():
        assert [s["prompt"] for s in samples] == PROMPTS
        for sample in samples:
            assert f"step {step:>6}  sample {sample['prompt']!r} -> {sample['completion']!r}" in proc.stdout

        # The checkpoint of that step, decoded greedily on its own, continues each prompt the same way.
        step_dir = run_dir / checkpoint.CHECKPOINTS / f"step_{step}"
        model, tok = load(step_dir).model, load_tokenizer(step_dir / checkpoint.TOKENIZER_DIR)
        for sample in samples:
            ids = tok.encode(sample["prompt"], add_special_tokens=False).ids
            new = generate(model, ids, Sampling(max_new_tokens=NEW_TOKENS, temperature=0), eos_id=eot_id(tok))
            assert tok.decode(new) == sample["completion"]

    tables = sorted(run_dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 2, list(run_dir.glob("wandb/*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion"] and [row[1] for row in table["data"]] == PROMPTS

    plain = tmp_path / "plain"  # the same run without samples trains bit for bit the same
    proc = run_train(plain, _overrides(data_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda d: [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(d) if "samples" not in r]  # noqa: E731
    assert [x for x in losses(run_dir) if x[1] or x[2]] == [x for x in losses(plain) if x[1] or x[2]]


def test_samples_become_a_wandb_table():
    record = {"step": 5, "samples": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]}
    table = _for_wandb(record)["samples"]
    assert table.columns == ["step", "prompt", "completion"] and table.data == [[5, "a", "b"], [5, "c", "d"]]


@pytest.mark.parametrize(
    ("layout", "skips"),
    [([], False), (["parallel=dp"], False), (["parallel=zero2"], False), (["parallel=tp2"], True),
     (["parallel=pp2"], True), (["parallel=zero3"], True), (["parallel=tp2-pp2"], True)],
)  # fmt: skip
def test_only_layouts_where_rank_0_holds_the_model_sample(layout, skips):
    cfg, _ = compose_config(layout)
    reason = skip_reason(cfg)
    assert (reason is not None) == skips
    if skips:
        assert "\n" not in reason and "train.sample_prompts" in reason and "trainer.generate" in reason


@pytest.mark.slow
def test_a_split_model_says_once_that_it_does_not_sample(tmp_path, data_cache):
    run_dir = tmp_path / "tp2"
    proc = run_layout("tp2", run_dir, _overrides(data_cache, *SAMPLING), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train.sample_prompts: no samples at this layout (tp 2, pp 1, ZeRO 0)") == 1
    assert not [r for r in read_metrics(run_dir) if "samples" in r] and "  sample '" not in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.sample_tokens=0"], "train.sample_tokens"),
        (["debug=smoke", "train.sample_prompts=[hello]", "train.sample_tokens=32"], "train.sample_tokens"),
        (["train.sample_prompts=['']"], "train.sample_prompts"),
        (["train.sample_prompts=[hello,'  ']"], "train.sample_prompts"),
        (["train.sample_promts=[hello]"], "train.sample_promts"),
    ],
)
def test_sample_keys_are_validated_in_one_line(overrides, key, capsys):
    with pytest.raises(SystemExit) as exited:
        preflight(overrides)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines


def test_a_prompt_longer_than_the_context_allows_is_refused(tmp_path, data_cache):
    """Counted in tokens once the tokenizer is known, before any process group starts."""
    long = " ".join(["words"] * 40)
    proc = run_train(
        tmp_path / "run", _overrides(data_cache, f"train.sample_prompts=['{long}']", "train.sample_tokens=8")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.sample_prompts" in lines[0] and "model.seq_len=32" in lines[0], lines
    assert not (tmp_path / "run").exists()


@torch.no_grad()
def test_sampling_restores_training_mode(tmp_path, data_cache):
    from trainer.data.prepare import prepare
    from trainer.model import GPT, ModelShape
    from trainer.training.samples import Samples

    cfg, _ = compose_config(_overrides(data_cache))
    prepared = prepare(cfg.data, log=lambda _: None)
    samples = Samples(PROMPTS, 4, prepared.tokenizer_dir, 32)
    model = GPT(ModelShape(2, 64, 4, 32, 511)).train()
    rows = samples.generate(model)
    assert model.training and [r["prompt"] for r in rows] == PROMPTS
    assert samples.generate(model.eval()) == rows and not model.training
