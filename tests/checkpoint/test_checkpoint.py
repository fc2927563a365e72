"""Checkpoint files: a damaged newest checkpoint is detected and passed over, pruning keeps the
newest, and a checkpoint of one parallel layout continues at another (resharding)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import LAYOUTS as SHARED
from conftest import PARITY_RTOL, ROOT, child_env, compose_config, read_metrics, run_train, tiny_corpus_overrides
from trainer.checkpoint.manifest import damage

# --- damaged checkpoints (one process, fast) --------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_cache):
    """A run that saved step_2 and step_4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=4", "train.save_interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _smoke(data_cache, *extra: str) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), *extra]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    size = path.stat().st_size
    path.write_bytes(bytes(range(256)) * (size // 256) + b"\0" * (size % 256))


DAMAGE = {
    "truncated sharded state": ("state/part_00000/__0_0.distcp", _truncate),
    "deleted deepspeed shard": ("mp_rank_00_model_states.pt", lambda p: p.unlink()),
    "garbage state index": ("state/part_00000/.metadata", _garbage),
    "no manifest (crashed save)": ("manifest.json", lambda p: p.unlink()),
}


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(kind, saved_run, tmp_path, data_cache):
    run_dir = _copy(saved_run, tmp_path)
    name, spoil = DAMAGE[kind]
    spoil(run_dir / "checkpoints" / "step_4" / name)
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=5", "train.resume=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipping damaged checkpoint step_4" in proc.stdout
    assert "at step 2 (same layout, exact)" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-3:] == [3, 4, 5]


@pytest.mark.parametrize("spoil", [_truncate, _garbage], ids=["sizes, before the process group", "checksums, after"])
def test_no_usable_checkpoint_is_one_line_and_exit_2(spoil, saved_run, tmp_path, data_cache):
    run_dir = _copy(saved_run, tmp_path)
    for tag in ("step_2", "step_4"):
        spoil(run_dir / "checkpoints" / tag / "state" / "part_00000" / "__0_0.distcp")
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=5", "train.resume=auto"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable checkpoint" in lines[0] and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "step_4").is_dir()  # nothing written before is lost


def test_keep_last_prunes_older_checkpoints(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=6", "train.save_interval=2", "train.keep_last=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_4", "step_6"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_6"


# --- resharding (launcher, slow) ----------------------------------------------------------------------

STEPS, SAVE_AT = 8, 4
BASE = ["parallel.micro_batch=4", "parallel.global_batch=8", "model.n_layer=4", f"train.steps={STEPS}"]
# name -> (ranks, overrides)
LAYOUTS = {  # the shared table's layouts under the names the resharding matrix reads best with
    "tp1-pp1": SHARED["single"],
    "tp1-pp2": SHARED["pp2"],
    "tp2-pp1": SHARED["tp2"],
    "tp2-pp2": SHARED["tp2-pp2"],
    "zero1-dp2": SHARED["zero1-dp2"],
    "zero3-dp2": SHARED["zero3-dp2"],
    "tp2-dp2-zero3": SHARED["tp2-dp2-zero3"],
}
BF16 = "parallel.precision=bf16"
LAYOUTS |= {f"{name}-bf16": (LAYOUTS[name][0], [*LAYOUTS[name][1], BF16]) for name in ("tp2-pp2", "zero3-dp2")}
LAYOUTS["pp2-dp2-bf16"] = (SHARED["pp2-dp2"][0], [*SHARED["pp2-dp2"][1], BF16])
RESHARDS = [("tp2-pp2", "tp1-pp1"), ("tp2-pp2", "tp1-pp2"), ("tp2-pp2", "tp2-pp1"), ("tp1-pp1", "tp2-pp2")]
RESHARDS += [("tp2-pp2", "zero1-dp2"), ("tp2-pp2", "zero3-dp2"), ("tp2-pp2-bf16", "zero3-dp2-bf16")]
RESHARDS += [("tp2-pp2-bf16", "pp2-dp2-bf16")]  # DeepSpeed's BF16_Optimizer: fp32 masters partitioned over dp
RESHARDS += [("zero1-dp2", "tp2-pp2")]  # saved from ZeRO-1's flat partitions, whose boundaries fall mid-row
RESHARDS += [("tp2-dp2-zero3", "tp1-pp1"), ("tp2-pp2", "tp2-dp2-zero3")]  # ZeRO-3 partitions of tp shards
# bf16 layouts round their activations differently (measured: losses within 2e-5 relative of the source's);
# a load that left ZeRO-3's 16-bit weights at their initial values was 1.8e-2 off at the first step.
BF16_RTOL = 1e-3


def _run(run_dir, layout: str, data_cache, *extra: str):
    ranks, overrides = LAYOUTS[layout]
    proc = run_train(run_dir, _smoke(data_cache, *BASE, *overrides, f"train.eval_interval={SAVE_AT}", *extra), ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_cache):
    """Uninterrupted source runs that checkpoint at step SAVE_AT, by layout."""
    runs = {}
    for layout in {source for source, _ in RESHARDS}:
        runs[layout] = tmp_path_factory.mktemp(layout) / "run"
        _run(runs[layout], layout, data_cache, f"train.save_interval={SAVE_AT}")
    return runs


def _close(a: float, b: float, rtol: float = PARITY_RTOL) -> bool:
    return abs(a - b) <= rtol * abs(b)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), RESHARDS, ids=[f"{s}-to-{t}" for s, t in RESHARDS])
def test_resharded_run_continues_like_the_source(source, target, sources, tmp_path, data_cache):
    step_dir = sources[source] / "checkpoints" / f"step_{SAVE_AT}"
    proc = _run(tmp_path / "run", target, data_cache, f"train.resume={step_dir}")
    assert f"at step {SAVE_AT} (resharded from" in proc.stdout and "Adam moments resharded" in proc.stdout
    before, after = read_metrics(sources[source]), read_metrics(tmp_path / "run")
    # The validation set is the same at every layout (train.eval_batches global batches), so the
    # validation loss carries over too, whatever the dp degrees.
    for key in ("loss", "val_loss"):
        want = {r["step"]: r[key] for r in before if key in r and r["step"] > SAVE_AT}
        got = {r["step"]: r[key] for r in after if key in r}
        assert sorted(got) == sorted(want), key
        rtol = BF16_RTOL if target.endswith("-bf16") else PARITY_RTOL
        for step in want:
            assert _close(got[step], want[step], rtol), (key, step, got[step], want[step])


# --- a checkpoint directory that cannot be written -------------------------------------------------------


def test_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the directory should be")
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=2"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and "train.save_interval=-1" in lines[0]
    assert not (run_dir / "metrics.jsonl").exists()


def test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(saved_run, tmp_path, data_cache):
    run_dir = _copy(saved_run, tmp_path)
    staging = run_dir / "checkpoints" / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.write_text("in the way")  # the next save cannot stage its files
    proc = run_train(run_dir, _smoke(data_cache, "train.steps=6", "train.save_interval=2", "train.resume=auto"))
    assert proc.returncode == 1
    assert "checkpoint error: checkpoint step_6 could not be written" in proc.stderr
    assert "newest: step_4" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert damage(run_dir / "checkpoints" / "step_4") is None


@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 80908288 vs 80908180"), "disk full"),
        (OSError(28, "No space left on device"), "No space left on device"),
        (RuntimeError("a bug, not the disk"), None),
    ],
    ids=["torch.save short write", "OSError", "other error"],
)
def test_a_save_that_storage_stops_is_one_line(tmp_path, monkeypatch, error, expected):
    """A full disk surfaces from DeepSpeed's torch.save as a RuntimeError; it becomes the same one-line
    SaveError as an OSError from DCP, naming the newest published checkpoint. Other errors pass through."""
    from trainer.checkpoint.store import SaveError, Saver

    def fail(self, step, client_state):
        raise error

    monkeypatch.setattr(Saver, "_save", fail)
    saver = Saver(engine=None, mesh=None, named_params=list, run_dir=tmp_path, meta={}, tokenizer_dir=None)
    with pytest.raises(SaveError if expected else RuntimeError) as raised:
        saver.save(6, {})
    if expected:
        assert expected in str(raised.value) and "newest: none" in str(raised.value)
    else:
        assert raised.value is error


# --- export of real checkpoints --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tp1-pp1", "tp2-pp2"])
def test_exported_checkpoint_reproduces_the_runs_validation_loss(source, sources, tmp_path, data_cache):
    """transformers on the exported directory computes the validation loss the trainer logged at the
    checkpoint's step (same batches), and the same logits as our GPT on the gathered weights."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    from trainer.checkpoint import consolidate, sharded
    from trainer.data.prepare import prepare
    from trainer.data.stream import TokenFile, eval_batches
    from trainer.model import GPT, ModelShape

    step_dir = sources[source] / "checkpoints" / f"step_{STEPS}"
    out = tmp_path / "hf"
    _run_module("trainer.export", step_dir, out)
    hf_model = GPT2LMHeadModel.from_pretrained(out).eval()

    cfg, _ = compose_config(_smoke(data_cache, *BASE))
    prepared = prepare(cfg.data, log=lambda _: None)
    batches = eval_batches(TokenFile(prepared.val_path, prepared.dtype), cfg.model.seq_len, 8, 4, 0, 1, 1)
    with torch.no_grad():
        hf_val = sum(F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()) for x, y in batches) / 2
    logged = [r["val_loss"] for r in read_metrics(sources[source]) if r.get("step") == STEPS and "val_loss" in r]
    assert _close(hf_val.item(), logged[-1]), (hf_val.item(), logged)

    meta = consolidate.read_meta(step_dir)["model"]
    ours = GPT(ModelShape(meta["n_layer"], meta["n_embd"], meta["n_head"], meta["seq_len"], meta["vocab_size"]))
    ours.load_state_dict(sharded.read_tensors(step_dir, "model"))
    x, _ = next(iter(eval_batches(TokenFile(prepared.val_path, prepared.dtype), cfg.model.seq_len, 4, 4, 0, 1, 1)))
    with torch.no_grad():
        assert torch.allclose(hf_model(x).logits, ours.eval()(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_imported_weights_start_a_run_like_the_checkpoint_they_came_from(sources, tmp_path, data_cache):
    """export -> import_hf -> train.init_from gives the same first step as init_from the checkpoint itself;
    resuming (rather than initialising) from an import is refused."""

    step_dir = sources["tp2-pp2"] / "checkpoints" / f"step_{STEPS}"
    for module, args in (
        ("trainer.export", [step_dir, tmp_path / "hf"]),
        ("trainer.import_hf", [tmp_path / "hf", tmp_path / "imported"]),
    ):
        _run_module(module, *args)
    first = {}
    for name, source in (("checkpoint", step_dir), ("imported", tmp_path / "imported")):
        proc = _run(tmp_path / name, "tp1-pp1", data_cache, f"train.init_from={source}", "train.steps=2")
        assert "initialised weights from" in proc.stdout
        first[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r][0]
    assert first["imported"] == first["checkpoint"]
    proc = run_train(tmp_path / "bad", _smoke(data_cache, *BASE, f"train.resume={tmp_path / 'imported'}"))
    assert proc.returncode == 2 and "start from it with train.init_from" in proc.stderr


def _run_module(module: str, *args) -> None:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
