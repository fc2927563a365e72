"""python -m trainer.evaluate: a checkpoint's loss on its run's validation set is the val_loss the trainer
logged at that step (gpt-tiny at tp1·pp1 and tp2·pp2, llama-tiny at tp1·pp1); other text is tokenized with
the checkpoint's own tokenizer; a Hugging Face directory evaluates once data are given; bad input is one
line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PARITY_RTOL, ROOT, child_env, padded_smoke_overrides, read_metrics, run_layout, small_corpus
from trainer.checkpoint import store as checkpoint
from trainer.inference.evaluate import EvaluateConfig, main

FAMILIES = {"gpt": ["model=gpt-tiny"], "llama": ["model=llama-tiny"]}
SEQ_LEN, GLOBAL_BATCH, EVAL_BATCHES = 32, 4, 3  # debug=smoke's seq_len and global batch


def _overrides(family: str, data_cache: Path) -> list[str]:
    """Smoke-sized models, a vocabulary of 511 that tp2 pads to 512; validation and a checkpoint at steps 2, 4."""
    return [
        *FAMILIES[family],
        *padded_smoke_overrides(data_cache),
        "train.steps=4",
        "train.eval_interval=2",
        "train.save_interval=2",
        f"train.eval_batches={EVAL_BATCHES}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """(family, layout) -> run directory, trained on first use."""
    runs = {}

    def get(family: str, layout: str) -> Path:
        if (family, layout) not in runs:
            run_dir = tmp_path_factory.mktemp(f"{family}-{layout}") / "run"
            proc = run_layout(layout, run_dir, _overrides(family, data_cache), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[family, layout] = run_dir
        return runs[family, layout]

    return get


@pytest.fixture(scope="module")
def hf_dir(trained, tmp_path_factory) -> Path:
    from trainer.hf.export import export

    out = tmp_path_factory.mktemp("hf") / "gpt"
    export(trained("gpt", "single") / checkpoint.CHECKPOINTS / "step_4", out, None)
    return out


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def evaluate_cli(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.evaluate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


def evaluate_here(capsys, tmp_path: Path, *args: object) -> tuple[dict, str]:
    """main() in this process: (the JSON it wrote, its last stdout line)."""
    out = tmp_path / "eval.json"
    assert main([*map(str, args), f"out={out}"]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out.strip().splitlines()[-1]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


CASES = [("gpt", "single"), ("gpt", "tp2-pp2"), ("llama", "single")]


@pytest.mark.parametrize(
    ("family", "layout"),
    [pytest.param(f, lay, marks=[pytest.mark.slow] if lay != "single" else []) for f, lay in CASES],
    ids=[f"{f}-{lay}" for f, lay in CASES],
)
def test_loss_is_the_logged_val_loss(family, layout, trained, tmp_path, capsys):
    """Step 2 through the real command line (a step directory), step 4 in-process (the run directory:
    its latest step)."""
    run_dir = trained(family, layout)
    logged = val_losses(run_dir)
    assert set(logged) == {2, 4}
    out = tmp_path / "step2.json"
    proc = evaluate_cli(f"ckpt={run_dir / checkpoint.CHECKPOINTS / 'step_2'}", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("loss ") and "val split of the run's data" in line and "model's own tokenizer" in line
    results = {2: json.loads(out.read_text())}
    results[4], line = evaluate_here(capsys, tmp_path, f"ckpt={run_dir}")
    assert "(step 4)" in line
    for step, result in results.items():
        deviation = relative(result["loss"], logged[step])
        print(f"\n{family} {layout} step {step}: evaluate {result['loss']:.9f}, val_loss {logged[step]:.9f}, "
              f"relative {deviation:.1e}")  # fmt: skip
        assert deviation <= PARITY_RTOL
        assert result["step"] == step
        assert result["tokens"] == GLOBAL_BATCH * EVAL_BATCHES * SEQ_LEN
        assert (result["seq_len"], result["global_batch"], result["eval_batches"]) == (SEQ_LEN, GLOBAL_BATCH, 3)


def test_a_run_that_read_an_existing_tokenizer(trained, tmp_path, data_cache, capsys):
    """data.tokenizer.source=PATH in the run's config (not "train"): still its own data, cache and tokenizer."""
    first = trained("gpt", "single") / checkpoint.CHECKPOINTS / "step_2"
    run_dir = tmp_path / "run"
    given = [*_overrides("gpt", data_cache), f"data.tokenizer.source={first / 'tokenizer'}", "train.steps=2"]
    proc = run_layout("single", run_dir, given)
    assert proc.returncode == 0, proc.stderr[-3000:]
    capsys.readouterr()
    assert main([f"ckpt={run_dir}", f"out={tmp_path / 'eval.json'}"]) == 0
    result, printed = json.loads((tmp_path / "eval.json").read_text()), capsys.readouterr().out
    assert "(the run's own, same tokenizer)" in printed and "val split of the run's data" in printed
    assert relative(result["loss"], val_losses(run_dir)[2]) <= PARITY_RTOL


def test_files_are_tokenized_with_the_checkpoint_tokenizer(trained, tmp_path, data_cache, capsys):
    """The run's corpus named as files, prepared afresh in another cache: the same tokens, so the same loss;
    the prepared tokenizer is the checkpoint's (none trained)."""
    step_dir = trained("gpt", "single") / checkpoint.CHECKPOINTS / "step_2"
    cache = tmp_path / "cache"
    corpus = small_corpus(data_cache)
    result, line = evaluate_here(
        capsys, tmp_path, f"ckpt={step_dir}", "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={cache}"
    )
    assert "tokenized with the model's own tokenizer" in line and str(step_dir / "tokenizer") in line
    (prepared,) = [p for p in cache.iterdir() if p.is_dir()]
    own = (step_dir / "tokenizer" / "tokenizer.json").read_bytes()
    assert (prepared / "tokenizer" / "tokenizer.json").read_bytes() == own
    assert relative(result["loss"], val_losses(trained("gpt", "single"))[2]) <= PARITY_RTOL
    assert result["tokens"] == GLOBAL_BATCH * EVAL_BATCHES * SEQ_LEN


def test_a_file_set_all_of_a_split_or_n_batches(trained, tmp_path, data_cache, capsys):
    step_dir = trained("gpt", "single") / checkpoint.CHECKPOINTS / "step_4"
    text = small_corpus(data_cache).read_text()[-80_000:]
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(text[:40_000])
    (tmp_path / "texts" / "b.txt").write_text(text[40_000:])
    data = ["data=files", f"data.paths=[{tmp_path / 'texts'}]", f"data.cache_dir={tmp_path / 'cache'}"]

    every, line = evaluate_here(capsys, tmp_path, f"ckpt={step_dir}", *data, "eval_batches=all")
    (prepared,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    val_tokens = json.loads((prepared / "meta.json").read_text())["val_tokens"]
    assert every["samples"] == (val_tokens - 1) // SEQ_LEN == every["distinct_samples"] > 0
    assert every["tokens"] == every["samples"] * SEQ_LEN and "all samples" in line

    train, _ = evaluate_here(capsys, tmp_path, f"ckpt={step_dir}", *data, "split=train", "eval_batches=2")
    assert train["tokens"] == 2 * GLOBAL_BATCH * SEQ_LEN and train["split"] == "train"

    many, line = evaluate_here(capsys, tmp_path, f"ckpt={step_dir}", *data, f"eval_batches={every['samples']}")
    assert many["samples"] == every["samples"] * GLOBAL_BATCH and many["distinct_samples"] == every["samples"]
    assert f"{every['samples']} distinct" in line  # the set wraps round the split, as the trainer's does
    assert relative(many["loss"], every["loss"]) < 1e-6  # every sample GLOBAL_BATCH times: the same mean


def test_a_hugging_face_directory_with_data(trained, hf_dir, tmp_path, data_cache, capsys):
    """The exported step 4 (tp=1: no padding rows to drop) on the run's corpus and validation geometry."""
    data = ["data=files", f"data.paths=[{small_corpus(data_cache)}]", f"data.cache_dir={data_cache}"]
    result, line = evaluate_here(capsys, tmp_path, f"ckpt={hf_dir}", *data, "global_batch=4", "eval_batches=3")
    assert line.endswith(f"model {hf_dir} (GPT-2)")
    assert result["step"] is None and result["tokens"] == GLOBAL_BATCH * EVAL_BATCHES * SEQ_LEN
    assert relative(result["loss"], val_losses(trained("gpt", "single"))[4]) <= PARITY_RTOL


# --- bad input ------------------------------------------------------------------------------------------


def _damaged(step_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged" / "step_2"
    shutil.copytree(step_dir, copy)
    victim = next(p for p in sorted((copy / "state").rglob("*")) if p.is_file() and p.stat().st_size > 100)
    victim.write_bytes(victim.read_bytes()[:-50])
    return copy


def _imported(hf: Path, tmp_path: Path) -> Path:
    from trainer.import_hf import main as import_main

    assert import_main([str(hf), str(tmp_path / "imported" / "step_0")]) == 0
    return tmp_path / "imported" / "step_0"


BAD = {  # name -> (arguments given the step directory, the HF directory and tmp_path; words of the line)
    "no ckpt": (lambda s, h, t: [], ["ckpt", "give a checkpoint"]),
    "missing": (lambda s, h, t: [f"ckpt={t / 'nothing'}"], ["ckpt", "no such file"]),
    "not a checkpoint": (lambda s, h, t: [f"ckpt={t}"], ["meta.json", "step directory"]),
    "damaged": (lambda s, h, t: [f"ckpt={_damaged(s, t)}"], ["damaged"]),
    "hf without data": (
        lambda s, h, t: [f"ckpt={h}"],
        ["is a Hugging Face directory", "no data recorded", "data=files"],
    ),
    "import without data": (lambda s, h, t: [f"ckpt={_imported(h, t)}"], ["no config.yaml", "data=files"]),
    "too small": (
        lambda s, h, t: [f"ckpt={s}", "data=files", f"data.paths=[{_small_file(t)}]", f"data.cache_dir={t / 'c'}"],
        ["fewer than one global batch", "global_batch"],
    ),
    "unknown key": (lambda s, h, t: [f"ckpt={s}", "eval_batchs=3"], ["eval_batchs", "did you mean eval_batches"]),
    "eval_batches": (lambda s, h, t: [f"ckpt={s}", "eval_batches=0"], ["eval_batches"]),
    "split": (lambda s, h, t: [f"ckpt={s}", "split=test"], ["split", "val, train"]),
    "seq_len": (lambda s, h, t: [f"ckpt={s}", "seq_len=64"], ["seq_len", "context, 32"]),
    "micro_batch": (lambda s, h, t: [f"ckpt={s}", "micro_batch=3"], ["micro_batch", "divide"]),
    "wrong type": (lambda s, h, t: [f"ckpt={s}", "global_batch=many"], ["global_batch"]),
    "trains no tokenizer": (lambda s, h, t: [f"ckpt={s}", "data.tokenizer.source=train"], ["data.tokenizer.source"]),
    "other tokenizer": (
        lambda s, h, t: [f"ckpt={s}", f"data.tokenizer.source={h}"],
        ["data.tokenizer.source", "own tokenizer"],
    ),
    "sweep": (lambda s, h, t: [f"ckpt={s},{s}"], ["ckpt", "one value per evaluation"]),
    "blend": (lambda s, h, t: [f"ckpt={s}", "data=blend", "data.blend=[{weight:1,data:pystdlib}]"], ["data.blend"]),
    "megatron": (lambda s, h, t: [f"ckpt={s}", "data=megatron"], ["data.source='megatron'", "one text source"]),
    "flag": (lambda s, h, t: ["--ckpt", str(s)], ["unknown option --ckpt"]),
}


def _small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"paragraph {i}: a few words" for i in range(40)))
    return path


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_exit_2(name, trained, hf_dir, tmp_path, capsys):
    step_dir = trained("gpt", "single") / checkpoint.CHECKPOINTS / "step_2"
    args, words = BAD[name]
    given = args(step_dir, hf_dir, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(given)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


def test_bad_input_through_the_command_line(tmp_path):
    proc = evaluate_cli(f"ckpt={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"config error: ckpt='{tmp_path / 'nothing'}': no such file or directory"
    ]


def test_readme_documents_every_evaluate_key():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Evaluate") :]
    section = section[: section.index("\n### ")]
    keys = [f.name for f in dataclasses.fields(EvaluateConfig) if f.name != "data"] + ["data.*"]
    assert [k for k in keys if f"| `{k}` |" not in section] == []
    assert (ROOT / "conf" / "evaluate.yaml").is_file()
