"""The GPT definition: parameter count, initialisation, shapes, tied head, causality."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, compose_config
from trainer.model import GPT, ModelShape

MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
PUBLISHED = {
    "gpt2-small": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1.5e9,
    "gpt3-1.3b": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13e9,
    "gpt3-175b": 175e9,
}


# Published parameter counts of the Llama configs (Hugging Face's models, counted exactly).
LLAMA_PARAMS = {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}


def _shape(m) -> ModelShape:
    return ModelShape.from_config(m)


@pytest.mark.parametrize("name", MODELS)
def test_param_count_equals_the_analytic_formula(name):
    m = compose_config([f"model={name}"])[0].model
    with torch.device("meta"):  # no memory, even for 175B
        model = GPT(_shape(m).padded())  # as the trainer builds it: the vocabulary padded to a multiple of 128
    built = sum(p.numel() for p in model.parameters())
    assert built == model.num_params() == _shape(m).params()
    # The published counts are of the unpadded vocabulary: the padding adds (padded V - V)·h embedding rows.
    counted = _shape(m).unpadded_params()
    assert built - counted == (_shape(m).padded_vocab() - m.vocab_size) * m.n_embd
    if name in LLAMA_PARAMS:
        assert counted == LLAMA_PARAMS[name] == built  # 32000 and 128256 are multiples of 128 already
    if m.mlp != "gelu":
        return
    formula = (
        12
        * m.n_layer
        * m.n_embd**2
        * (1 + 13 / (12 * m.n_embd) + (m.vocab_size + m.seq_len) / (12 * m.n_layer * m.n_embd))
    )
    assert counted == _shape(m).narayanan_params() + 2 * m.n_embd
    assert math.isclose(counted - 2 * m.n_embd, formula, rel_tol=1e-12)
    if name in PUBLISHED:  # the named sizes are what the papers call them (within 5%)
        assert abs(counted / PUBLISHED[name] - 1) < 0.05, counted


def _tiny(seed=0) -> GPT:
    return GPT(ModelShape(n_layer=2, n_embd=32, n_head=4, seq_len=16, vocab_size=64), seed=seed)


def test_output_head_is_tied_to_the_input_embedding():
    model = _tiny()
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 64)
    model.wte.weight.data.mul_(2.0)  # the head must see the change: it is the same tensor
    assert not torch.allclose(model(idx), logits)


def test_gpt2_initialisation_statistics():
    shape = ModelShape(n_layer=4, n_embd=256, n_head=4, seq_len=64, vocab_size=512)
    model = GPT(shape, seed=3)
    residual = 0.02 / math.sqrt(2 * shape.n_layer)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[1].attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.ln_f.weight == 1)


def test_initialisation_depends_only_on_seed_and_parameter_name():
    a, b, c = _tiny(seed=1), _tiny(seed=1), _tiny(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name
    assert not torch.equal(a.blocks[0].attn.qkv.weight, a.blocks[1].attn.qkv.weight)


def test_attention_is_causal():
    model = _tiny().eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :10], model(changed)[:, :10], atol=1e-6)
        assert not torch.allclose(model(idx)[:, 10:], model(changed)[:, 10:])


def test_loss_matches_cross_entropy_and_starts_near_log_vocab():
    model = _tiny()
    idx, targets = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert torch.allclose(loss, expected)
    assert abs(loss.item() - math.log(64)) < 0.5
