"""Export to and import from Hugging Face Llama (trainer.export, trainer.import_hf, trainer.hf.llama).

The conversion alone (random weights large enough that a wrong row order shows), a llama-tiny trained
through the real command line at tp1·pp1 and tp2·pp2 and exported, and a LlamaForCausalLM made by
transformers imported and trained from, all offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import (
    PARITY_RTOL,
    ROOT,
    child_env,
    compose_config,
    padded_smoke_overrides,
    read_metrics,
    run_layout,
    run_train,
    small_corpus,
)
from trainer.checkpoint import consolidate, sharded
from trainer.checkpoint import store as checkpoint
from trainer.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from trainer.export import main as export_main
from trainer.hf import convert as hf
from trainer.import_hf import main as import_main
from trainer.model.gpt import GPT
from trainer.model.shape import ModelShape

# Grouped-query attention (4 query heads sharing 2 key/value heads), an odd vocabulary that tp=4 pads,
# an MLP width off the SwiGLU rule, a rotary base and an ε off every default.
SHAPE = ModelShape(
    n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=101, n_kv_head=2, ffn_hidden=96,
    mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=5e5, bias=False, tie_embeddings=False,
)  # fmt: skip
VARIANTS = {
    "untied": {},
    "bias-tied": {"bias": True, "tie_embeddings": True},
    "mha-bias": {"n_kv_head": 4, "bias": True},
}
ATOL = 1e-4  # as tests/hf/test_hf.py: fp32 kernels differ by ~1e-6; a wrong layout moves logits by O(1)


def run_module(module: str, *args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    env = child_env(TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(word in lines[0] for word in words), lines[0]


@torch.no_grad()
def random_gpt(shape: ModelShape, seed: int) -> GPT:
    """Our model with weights ~0.1 and norm weights ~1 ± 0.1 (biases too): large enough that a wrong row
    order moves the logits by O(1)."""
    model = GPT(shape, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        is_norm_weight = ".ln_" in f".{name}" and name.endswith("weight")
        param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise)
    return model


def variant(name: str) -> ModelShape:
    return replace(SHAPE, **VARIANTS[name])


def hf_names(shape: ModelShape) -> set[str]:
    """The tensors transformers' own LlamaForCausalLM stores for ``shape`` (tied: no lm_head)."""
    config = LlamaConfig(**hf.family_of(shape).hf_config(shape, 0))
    with torch.device("meta"):
        names = set(LlamaForCausalLM(config).state_dict())
    return names - ({"lm_head.weight"} if shape.tie_embeddings else set())


def load_llama(directory: Path) -> LlamaForCausalLM:
    model, info = LlamaForCausalLM.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# --- the conversion alone -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_is_bit_identical(name):
    shape = variant(name)
    ours = random_gpt(shape.padded(4), seed=5).state_dict()  # vocabulary padded as tp=4 pads it
    theirs = hf.to_hf(ours, shape)
    assert set(theirs) == hf_names(shape)
    assert theirs["model.embed_tokens.weight"].shape == (101, 64)  # padding rows dropped
    assert theirs["model.layers.0.self_attn.k_proj.weight"].shape == (shape.kv_heads * 16, 64)
    assert theirs["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
    back = hf.from_hf(theirs, shape)
    assert back.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(back[key], tensor[:101] if key in hf.VOCAB_ROWS else tensor), key
    again = hf.to_hf(back, shape)
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_fused_rows_follow_the_documented_layout():
    """qkv rows per key/value group [q_{2g} q_{2g+1} k_g v_g] and fc1 rows [gate_0 up_0 gate_1 ...]."""
    d, f = SHAPE.head_dim, SHAPE.ffn_size
    state = {name: torch.zeros(shape) for name, shape in hf.our_shapes(SHAPE).items()}
    state["blocks.0.attn.qkv.weight"] = torch.arange(8 * d).repeat_interleave(64).reshape(8 * d, 64).float()
    state["blocks.0.mlp.fc1.weight"] = torch.arange(2 * f).repeat_interleave(64).reshape(2 * f, 64).float()
    theirs = hf.to_hf(state, SHAPE)
    row = lambda name: theirs[f"model.layers.0.{name}"][:, 0].long()  # noqa: E731
    head = lambda i: torch.arange(i * d, (i + 1) * d)  # noqa: E731  our d-row block i
    assert torch.equal(row("self_attn.q_proj.weight"), torch.cat([head(0), head(1), head(4), head(5)]))
    assert torch.equal(row("self_attn.k_proj.weight"), torch.cat([head(2), head(6)]))
    assert torch.equal(row("self_attn.v_proj.weight"), torch.cat([head(3), head(7)]))
    assert torch.equal(row("mlp.gate_proj.weight"), torch.arange(0, 2 * f, 2))
    assert torch.equal(row("mlp.up_proj.weight"), torch.arange(1, 2 * f, 2))


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_converted_weights_give_transformers_our_logits(name):
    shape = variant(name)
    ours = random_gpt(shape.padded(4), seed=6)
    theirs = LlamaForCausalLM(LlamaConfig(**hf.family_of(shape).hf_config(shape, 0))).eval()
    theirs.load_state_dict(hf.to_hf(ours.state_dict(), shape), strict=not shape.tie_embeddings)
    idx = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = ours(idx)[..., :101]
    diff = (expected - theirs(idx).logits).abs().max().item()
    print(f"\n{name}: max |logit difference| = {diff:.3e} (logits up to {expected.abs().max().item():.2f})")
    assert expected.abs().max() > 1.0 and diff < ATOL


@pytest.mark.parametrize(
    "change, words",
    [
        ({"mlp": "gelu"}, ["LlamaForCausalLM", "mlp=gelu"]),
        ({"position": "learned"}, ["LlamaForCausalLM", "position=learned"]),
        (
            {
                "norm": "layernorm",
                "mlp": "gelu",
                "position": "learned",
                "ffn_hidden": 0,
                "bias": True,
                "tie_embeddings": True,
            },
            ["GPT2LMHeadModel", "n_kv_head=2"],
        ),
        ({"norm": "layernorm"}, ["LlamaForCausalLM", "norm=layernorm"]),
    ],
)
def test_export_refuses_what_no_family_represents(change, words):
    with pytest.raises(hf.Unsupported) as refused:
        hf.family_of(replace(SHAPE, **change))
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_export_command_refuses_a_mix_in_one_line(tmp_path, capsys):
    step_dir = tmp_path / "step_3"
    step_dir.mkdir()
    mix = replace(SHAPE, mlp="gelu", ffn_hidden=0)  # RMSNorm and rotary, but a GELU MLP
    consolidate.write_meta(step_dir, {"model": mix.meta(), "step": 3, "tokens": 0, "adam_step": 3, "layout": {}})
    assert export_main([str(step_dir), str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "mlp=gelu", "LlamaForCausalLM")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 101,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
}


def test_config_reads_to_the_full_model_meta():
    assert hf.model_shape(CONFIG) == SHAPE.meta()
    legacy = {k: v for k, v in CONFIG.items() if k != "rope_parameters"} | {"rope_theta": 5e5, "rope_scaling": None}
    assert hf.model_shape(legacy) == SHAPE.meta()  # transformers 4.x's names
    tied = hf.model_shape({**CONFIG, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True})
    assert tied == variant("bias-tied").meta()


@pytest.mark.parametrize(
    "change, word",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
        ({"attention_bias": True}, "mlp_bias"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
        ({"model_type": "mistral"}, "model_type"),
    ],
)
def test_llama_configs_this_model_cannot_compute_are_refused(change, word):
    with pytest.raises(hf.Unsupported, match=word) as refused:
        hf.model_shape({k: v for k, v in {**CONFIG, **change}.items() if v is not None})
    assert "\n" not in str(refused.value)


# --- a trained llama-tiny, exported -----------------------------------------------------------------


def train_overrides(data_cache: Path) -> list[str]:
    """llama-tiny at debug=smoke's size (2 layers, n_embd 64, 2 key/value heads), seq_len 64, a vocabulary
    of 511 that tp2 pads to 512, a Llama-3 rotary base; a checkpoint at step 2."""
    return [
        "model=llama-tiny",
        *padded_smoke_overrides(data_cache),
        "model.seq_len=64",
        "model.rope_theta=500000",
        "train.steps=2",
        "train.save_interval=2",
    ]


@pytest.mark.parametrize("layout", ["single", pytest.param("tp2-pp2", marks=pytest.mark.slow)])
@torch.no_grad()
def test_trained_llama_exports_to_transformers_with_our_logits(layout, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = run_layout(layout, run_dir, train_overrides(data_cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "hf"
    result = run_module("trainer.export", run_dir, out)
    assert result.returncode == 0, result.stderr
    assert "step 2" in result.stdout and "LlamaForCausalLM" in result.stdout

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == 5e5
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    expected = {"max_position_embeddings": 64, "rms_norm_eps": 1e-5, "intermediate_size": 256, "head_dim": 16}
    expected |= {"num_key_value_heads": 2, "num_attention_heads": 4, "vocab_size": 511, "tie_word_embeddings": False}
    assert {k: config[k] for k in expected} == expected
    stored = load_file(str(out / "model.safetensors"))
    assert stored["lm_head.weight"].shape == stored["model.embed_tokens.weight"].shape == (511, 64)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()

    step_dir = run_dir / checkpoint.CHECKPOINTS / "step_2"
    saved = sharded.read_tensors(step_dir)
    rows = saved["wte.weight"].shape[0]
    assert rows == 512  # 511 padded to a multiple of 128 (× tp): the export drops the padding row
    ours = GPT(replace(ModelShape.from_meta(consolidate.read_meta(step_dir)["model"]), vocab_size=rows)).eval()
    ours.load_state_dict(saved)
    text = small_corpus(data_cache).read_text()[:5000]
    ids = load_tokenizer(step_dir / checkpoint.TOKENIZER_DIR).encode(text).ids
    idx = torch.tensor([ids[:64], ids[64:128]])
    expected_logits = ours(idx)[..., :511]
    diff = (expected_logits - load_llama(out)(idx).logits).abs().max().item()
    print(f"\n{layout}: max |logit difference| = {diff:.3e} (logits up to {expected_logits.abs().max().item():.2f})")
    assert diff < ATOL


# --- a transformers Llama, imported and trained from ------------------------------------------------


def save_transformers_llama(directory: Path, text: str) -> LlamaForCausalLM:
    """A LlamaForCausalLM made and saved by transformers itself: grouped-query attention, untied head,
    random weights (norms included), a BPE tokenizer trained on ``text`` saved beside it."""
    tok = train_bpe([text], 300)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=301, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(7)
        model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)
    save_tokenizer(tok, directory)
    return model


@pytest.mark.parametrize("files", ["safetensors", "shards", "bin"])
@torch.no_grad()
def test_import_of_a_transformers_llama_computes_the_same(files, tmp_path, data_cache, capsys):
    """Streamed from one safetensors file or from shards, or loaded whole by transformers (pytorch_model.bin)."""
    theirs = save_transformers_llama(tmp_path / "hf", small_corpus(data_cache).read_text()[:200_000])
    if files == "shards":
        (tmp_path / "hf" / "model.safetensors").unlink()
        theirs.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    elif files == "bin":
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert import_main([str(tmp_path / "hf"), str(tmp_path / "step_0")]) == 0
    assert "Llama" in capsys.readouterr().out
    meta = consolidate.read_meta(tmp_path / "step_0")["model"]
    assert meta == ModelShape.from_meta(meta).meta() and meta["n_kv_head"] == 2 and not meta["tie_embeddings"]
    ours = GPT(ModelShape.from_meta(meta)).eval()
    ours.load_state_dict(sharded.read_tensors(tmp_path / "step_0"))  # strict: exactly our names
    idx = torch.randint(0, 301, (2, 64), generator=torch.Generator().manual_seed(0))
    assert (ours(idx) - theirs(idx).logits).abs().max() < ATOL

    again = tmp_path / "again"  # and back: the very tensors transformers holds
    assert export_main([str(tmp_path / "step_0"), str(again)]) == 0
    exported, original = load_file(str(again / "model.safetensors")), theirs.state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_untied_llama_without_its_head_is_refused(tmp_path, data_cache, capsys):
    save_transformers_llama(tmp_path / "hf", small_corpus(data_cache).read_text()[:20_000])
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert import_main([str(tmp_path / "hf"), str(tmp_path / "step_0")]) == 2
    assert_one_line_error(capsys.readouterr().err, "lm_head.weight")
    assert not (tmp_path / "step_0").exists()


def test_training_from_an_imported_llama_starts_at_transformers_loss(tmp_path, data_cache):
    """import_hf's printed overrides build the same model: the first logged loss is the loss
    transformers computes on the first training batch."""
    text = small_corpus(data_cache).read_text()[:200_000]
    theirs = save_transformers_llama(tmp_path / "hf", text)
    result = run_module("trainer.import_hf", tmp_path / "hf", tmp_path / "step_0")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split("train from it with ", 1)[1].split()
    for override in ("model.n_kv_head=2", "model.mlp=swiglu", "model.norm=rmsnorm", "model.position=rope"):
        assert override in printed, printed
    assert "model.tie_embeddings=false" in printed and "model.bias=false" in printed

    data = ["debug=smoke", "data=files", f"data.paths=[{small_corpus(data_cache)}]", f"data.cache_dir={data_cache}"]
    overrides = [*data, *printed, "train.steps=1"]  # the default model (gpt-tiny): the overrides say it all
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised weights from" in proc.stdout
    logged = [r["loss"] for r in read_metrics(run_dir) if "loss" in r][0]

    from trainer.data.prepare import prepare
    from trainer.data.stream import SampleStream, TokenFile

    cfg, _ = compose_config(overrides)
    prepared = prepare(cfg.data, log=lambda _: None)
    tokens = TokenFile(prepared.train_path, prepared.dtype)
    stream = SampleStream(tokens, cfg.model.seq_len, cfg.parallel.global_batch, 1, 0, 1, cfg.train.seed)
    x, y = stream.next_micro_batch()  # the first optimizer step's global batch
    with torch.no_grad():
        loss = F.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten()).item()
    print(f"\nfirst logged loss {logged:.6f}, transformers {loss:.6f} (relative {abs(logged - loss) / loss:.1e})")
    assert abs(logged - loss) <= PARITY_RTOL * loss
