"""Export to and import from Hugging Face GPT-2 (trainer.export, trainer.import_hf, trainer.hf.convert).

A small dense GPT with random weights everywhere (biases and LayerNorms included, so a wrong QKV
permutation or transpose cannot hide behind zeros) is written as a consolidated checkpoint split
over two pipeline-stage files with a tensor-parallel-padded vocabulary, then exported and loaded
with transformers, offline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import ROOT, child_env, small_corpus
from trainer.checkpoint import consolidate, manifest, sharded
from trainer.checkpoint import store as checkpoint
from trainer.data.tokenizer import EOT, load_tokenizer, save_tokenizer, train_bpe
from trainer.export import main as export_main
from trainer.hf import convert as hf
from trainer.import_hf import main as import_main
from trainer.model.gpt import GPT, ModelShape

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=300)  # meta.json's "model"
PADDED_ROWS = 304  # wte rows as tp=4 would pad 300 (padded_vocab(300, 4))
# fp32 on both sides; the two differ only in kernel order (SDPA vs HF's attention, tanh-GELU
# formulas), which moves logits of magnitude ~1 by ~1e-6. 1e-4 leaves room without hiding a bug:
# a wrong permutation moves them by O(1).
ATOL = 1e-4
TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "  odd  spacing\tand 123 digits!\n"]


def run_module(module: str, *args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    env = child_env(TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@torch.no_grad()
def random_gpt(shape: ModelShape, seed: int) -> GPT:
    model = GPT(shape, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        is_ln_weight = ".ln_" in f".{name}" and name.endswith("weight")
        param.copy_(1.0 + 0.1 * noise if is_ln_weight else 0.1 * noise)
    return model


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return small_corpus(tmp_path_factory.mktemp("corpus")).read_text()[:200_000]


@pytest.fixture(scope="module")
def dense() -> GPT:
    return random_gpt(ModelShape(**{**SHAPE, "vocab_size": PADDED_ROWS}), seed=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dense, text) -> Path:
    """runs/<id>/ with checkpoints/step_20 holding what a tp·pp2 run writes, and checkpoints/latest."""
    run = tmp_path_factory.mktemp("run")
    step_dir = run / checkpoint.CHECKPOINTS / "step_20"
    step_dir.mkdir(parents=True)
    sharded.write_tensors(step_dir, {"model": dense.state_dict()})
    layout = {"tp": 4, "pp": 2, "dp": 1, "zero_stage": 1}
    consolidate.write_meta(step_dir, {"model": SHAPE, "step": 20, "tokens": 20480, "adam_step": 20, "layout": layout})
    tok = train_bpe([text], SHAPE["vocab_size"])
    assert tok.get_vocab_size() <= SHAPE["vocab_size"]
    save_tokenizer(tok, step_dir / checkpoint.TOKENIZER_DIR)
    manifest.write(step_dir)
    (run / checkpoint.CHECKPOINTS / checkpoint.LATEST).write_text("step_20\n")
    return run


@pytest.fixture(scope="module")
def step_dir(run_dir) -> Path:
    return run_dir / checkpoint.CHECKPOINTS / "step_20"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """The run directory exported by the real command line (it resolves checkpoints/latest)."""
    out = tmp_path_factory.mktemp("export") / "gpt2"
    result = run_module("trainer.export", run_dir, out)
    assert result.returncode == 0, result.stderr
    assert "step 20" in result.stdout
    return out


def load_hf(directory: Path) -> GPT2LMHeadModel:
    model, info = GPT2LMHeadModel.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def token_batch(step_dir: Path, text: str) -> torch.Tensor:
    ids = load_tokenizer(step_dir / checkpoint.TOKENIZER_DIR).encode(text[:2000]).ids
    return torch.tensor([ids[:32], ids[32:64]])


# --- export -----------------------------------------------------------------------------------------


def test_export_writes_a_tied_gpt2_directory(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not exported.with_name("gpt2.tmp").exists()
    model = load_hf(exported)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, not a copy
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (2, 64, 4, 32)
    assert config.vocab_size == 300 and config.activation_function == "gelu_new"
    assert model.transformer.wte.weight.shape == (300, 64)  # tensor-parallel padding rows dropped
    assert "lm_head.weight" not in load_file(str(exported / "model.safetensors"))  # as transformers saves it


@torch.no_grad()
def test_exported_logits_equal_ours(exported, dense, step_dir, text):
    idx = token_batch(step_dir, text)
    ours = dense(idx)[..., : SHAPE["vocab_size"]]
    theirs = load_hf(exported)(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |logit difference| = {diff:.3e} (logits up to {ours.abs().max().item():.2f}, atol {ATOL})")
    assert ours.abs().max() > 1.0  # weights large enough for a wrong layout to show
    assert diff < ATOL


def test_exported_tokenizer_gives_our_ids(exported, step_dir, text):
    ours = load_tokenizer(step_dir / checkpoint.TOKENIZER_DIR)
    theirs = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    for sample in [*TEXTS, text[:3000]]:
        ids = ours.encode(sample).ids
        assert theirs(sample)["input_ids"] == ids
        assert theirs.decode(ids) == sample
    assert theirs.eos_token == EOT
    config = json.loads((exported / "config.json").read_text())
    assert config["eos_token_id"] == ours.token_to_id(EOT)


def test_export_takes_a_tokenizer_option(step_dir, tmp_path, capsys):
    bare = tmp_path / "step_20"
    shutil.copytree(step_dir, bare, ignore=shutil.ignore_patterns(checkpoint.TOKENIZER_DIR, manifest.MANIFEST))
    assert export_main([str(bare), str(tmp_path / "no-tok")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--tokenizer")
    tokenizer_json = step_dir / checkpoint.TOKENIZER_DIR / "tokenizer.json"
    assert export_main([str(bare), str(tmp_path / "out"), "--tokenizer", str(tokenizer_json)]) == 0
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert theirs(TEXTS[0])["input_ids"] == load_tokenizer(tokenizer_json).encode(TEXTS[0]).ids


# --- import -----------------------------------------------------------------------------------------


def test_import_then_export_round_trips_exactly(exported, step_dir, tmp_path, capsys):
    imported = tmp_path / "imported" / "step_0"
    assert import_main([str(exported), str(imported)]) == 0
    assert "train.init_from=" in capsys.readouterr().out
    meta = consolidate.read_meta(imported)
    assert meta["model"] == SHAPE and meta["step"] == 0 and meta["layout"]["source"] == "hf"
    assert manifest.damage(imported) is None  # manifest written, as train.init_from verifies it
    original, back = sharded.read_tensors(step_dir), sharded.read_tensors(imported)
    original["wte.weight"] = original["wte.weight"][: SHAPE["vocab_size"]]
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert (imported / checkpoint.TOKENIZER_DIR / "tokenizer.json").is_file()

    again = tmp_path / "again"
    assert export_main([str(imported), str(again)]) == 0
    first, second = load_file(str(exported / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "config.json").read_text()) == json.loads((exported / "config.json").read_text())


def save_transformers_gpt2(directory: Path, **overrides) -> GPT2LMHeadModel:
    """A GPT-2 made and saved by transformers itself, random weights, biases included."""
    config = GPT2Config(n_layer=2, n_embd=48, n_head=3, n_positions=16, vocab_size=97, **overrides)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("legacy_names", [False, True], ids=["transformers-5", "hub-gpt2-names"])
@torch.no_grad()
def test_import_of_a_transformers_model_computes_the_same(tmp_path, capsys, legacy_names):
    theirs = save_transformers_gpt2(tmp_path / "hf", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if legacy_names:  # the hub's openai-community/gpt2 file names its tensors without "transformer."
        weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
        from safetensors.torch import save_file

        renamed = {k.removeprefix(hf.HF_PREFIX): v for k, v in weights.items()}
        save_file(renamed, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert import_main([str(tmp_path / "hf"), str(tmp_path / "step_0")]) == 0
    assert "no tokenizer files" in capsys.readouterr().out
    meta = consolidate.read_meta(tmp_path / "step_0")
    ours = GPT(ModelShape(**meta["model"])).eval()
    ours.load_state_dict(sharded.read_tensors(tmp_path / "step_0"))  # strict: exactly the GPT's names
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (ours(idx) - theirs(idx).logits).abs().max() < ATOL


def test_untied_head_is_refused(tmp_path, capsys):
    save_transformers_gpt2(tmp_path / "hf", tie_word_embeddings=False)
    assert import_main([str(tmp_path / "hf"), str(tmp_path / "step_0")]) == 2
    assert_one_line_error(capsys.readouterr().err, "lm_head")
    assert not (tmp_path / "step_0").exists() and not (tmp_path / "step_0.tmp").exists()


@pytest.mark.parametrize(
    "change, word",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"n_inner": 100}, "n_inner"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
    ],
)
def test_gpt2_variants_this_gpt_cannot_compute_are_refused(change, word):
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32, "vocab_size": 300}
    assert hf.model_shape(config) == SHAPE
    with pytest.raises(hf.Unsupported, match=word):
        hf.model_shape({**config, **change})


# --- bad input: one line, exit code 2, nothing written ----------------------------------------------


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    missing = run_module("trainer.export", tmp_path / "nowhere", tmp_path / "out")
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "nowhere", "does not exist")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    refused = run_module("trainer.import_hf", bert, tmp_path / "step_0")
    assert refused.returncode == 2
    assert_one_line_error(refused.stderr, "model_type", "bert")
    assert not any(p.name.startswith(("out", "step_0")) for p in tmp_path.iterdir())


def test_more_bad_inputs_in_process(exported, step_dir, tmp_path, capsys):
    cases = [
        (import_main, [str(tmp_path / "nowhere"), str(tmp_path / "a")], "does not exist"),
        (import_main, [str(step_dir), str(tmp_path / "b")], "no config.json"),  # ours is not an HF dir
        (export_main, [str(exported), str(tmp_path / "c")], "meta.json"),  # an HF dir is not a checkpoint
        (export_main, [str(step_dir), str(exported)], "already exists"),  # never overwrites
    ]
    for main, argv, word in cases:
        assert main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, word)
    with pytest.raises(SystemExit) as usage:
        export_main([])
    assert usage.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "usage:")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_weights_are_written_a_tensor_at_a_time(tmp_path):
    """The streaming writer holds one tensor at a time and writes what safetensors itself would read back."""
    import gc
    import weakref

    from safetensors.torch import load_file

    from trainer.hf.files import write_safetensors

    tensors = {f"t{i}": torch.randn(3 + i, 5) for i in range(4)}
    alive: list[weakref.ref] = []

    def produce(name):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        tensor = tensors[name].clone()
        alive.append(weakref.ref(tensor))
        return tensor

    items = [(name, lambda name=name: produce(name)) for name in tensors]
    write_safetensors(
        tmp_path / "w.safetensors", items, {n: tuple(t.shape) for n, t in tensors.items()}, {"format": "pt"}
    )
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in tensors.items()) and len(alive) == 4
