"""Decoding (trainer.inference, python -m trainer.generate): greedy continuations equal transformers'
generate() on the exported model token for token, for checkpoints saved at tp1·pp1 and tp2·pp2 of both
model families; the key/value cache changes nothing; bad input is one line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, child_env, padded_smoke_overrides, run_layout
from trainer.checkpoint import manifest
from trainer.checkpoint import store as checkpoint
from trainer.data.tokenizer import load_tokenizer
from trainer.hf.export import export
from trainer.inference.decode import Sampling, generate
from trainer.inference.load import load

NEW_TOKENS = 64
PROMPTS = ["def main(", "import os\nimport sys\n", "The quick brown fox", "class Parser:\n    def __init__(self"]
FAMILIES = {"gpt": ["model=gpt-tiny"], "llama": ["model=llama-tiny"]}
CASES = [(family, layout) for family in FAMILIES for layout in ("single", "tp2-pp2")]


def _overrides(family: str, data_cache) -> list[str]:
    """Smoke-sized models with room for a prompt and 64 new tokens; a vocabulary of 511 that tp2 pads."""
    return [
        *FAMILIES[family],
        *padded_smoke_overrides(data_cache),
        "model.seq_len=128",
        "train.steps=100",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """family, layout -> (step directory, exported Hugging Face directory); trained on first use."""
    runs = {}

    def get(family: str, layout: str):
        if (family, layout) not in runs:
            root = tmp_path_factory.mktemp(f"{family}-{layout}")
            proc = run_layout(layout, root / "run", _overrides(family, data_cache), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            step_dir = root / "run" / checkpoint.CHECKPOINTS / "step_100"
            export(step_dir, root / "hf", None)
            runs[family, layout] = step_dir, root / "hf"
        return runs[family, layout]

    return get


def _transformers_greedy(hf_dir, ids: list[int]) -> list[int]:
    from transformers.utils import logging

    logging.disable_progress_bar()
    net = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    net.generation_config.eos_token_id = None  # 64 tokens, whatever they are
    net.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = net.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    ("family", "layout"),
    [pytest.param(f, lay, marks=[pytest.mark.slow] if lay != "single" else []) for f, lay in CASES],
    ids=[f"{f}-{lay}" for f, lay in CASES],
)
def test_greedy_equals_transformers_generate(family, layout, trained):
    step_dir, hf_dir = trained(family, layout)
    loaded = load(step_dir)
    tok = load_tokenizer(loaded.tokenizer)
    greedy = Sampling(NEW_TOKENS, temperature=0.0)
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        ours = generate(loaded.model, ids, greedy)
        assert len(ours) == NEW_TOKENS and len(set(ours)) > 1  # not one token repeated: a real comparison
        assert ours == _transformers_greedy(hf_dir, ids), prompt
        assert generate(loaded.model, ids, greedy, cache=False) == ours  # the cache changes nothing


def test_sampling_is_reproducible_by_seed_and_the_cache_changes_nothing(trained):
    step_dir, _ = trained("llama", "single")
    loaded = load(step_dir)
    ids = load_tokenizer(loaded.tokenizer).encode(PROMPTS[0]).ids
    runs = {seed: generate(loaded.model, ids, Sampling(32, 1.0, 50, 0.95, seed)) for seed in (1, 2)}
    assert generate(loaded.model, ids, Sampling(32, 1.0, 50, 0.95, 1), cache=False) == runs[1]
    assert runs[1] != runs[2]


def _generate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.generate", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_command_line_streams_the_greedy_continuation(trained):
    step_dir, _ = trained("gpt", "single")
    run_dir = step_dir.parent.parent
    proc = _generate(f"ckpt={run_dir}", "prompt='def main('", "temperature=0", "max_new_tokens=16")
    assert proc.returncode == 0, proc.stderr
    loaded = load(step_dir)
    tok = load_tokenizer(loaded.tokenizer)
    ids = tok.encode("def main(").ids
    expected = generate(loaded.model, ids, Sampling(16, 0.0), eos_id=tok.token_to_id("<|endoftext|>"))
    assert proc.stdout == "def main(" + tok.decode(expected) + "\n"
    assert "tokens/s" in proc.stderr


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    step_dir, _ = trained("gpt", "single")
    damaged = tmp_path / "damaged"
    shutil.copytree(step_dir, damaged)
    (damaged / manifest.MANIFEST).unlink()
    long_prompt = "x " * 200
    cases = [
        ([f"ckpt={tmp_path / 'missing'}", "prompt=hi"], "ckpt"),
        ([f"ckpt={damaged}", "prompt=hi"], "damaged"),
        ([f"ckpt={step_dir}", "prompt="], "prompt"),
        ([f"ckpt={step_dir}", f"prompt={long_prompt}"], "shorten it or lower max_new_tokens"),
        ([f"ckpt={step_dir}", "prompt=hi", "top_p=1.5"], "top_p"),
        ([f"ckpt={step_dir}", "prompt=hi", "temperature=-1"], "temperature"),
        ([f"ckpt={step_dir}", "prompt=hi", "max_new_tokens=500"], "max_new_tokens"),
        ([f"ckpt={step_dir}", "prompt=hi", "+tempreature=1"], "did you mean temperature"),
    ]
    for args, words in cases:
        proc = _generate(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and words in lines[-1] and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert not [line for line in lines if not line.startswith("#")][:-1], proc.stderr  # one line (and counts)
