"""The Llama-style parts of the model, each against a direct single-device formula: grouped-query
attention, rotary positions, the SwiGLU MLP, RMSNorm, the untied head and the parameter count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model import GPT, ModelShape
from trainer.model.gpt import apply_rope, rope_tables
from trainer.model.shape import swiglu_hidden

LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False)


def _shape(**kw) -> ModelShape:
    base = dict(n_layer=2, n_embd=64, n_head=8, seq_len=16, vocab_size=96, n_kv_head=2, **LLAMA)
    return ModelShape(**{**base, **kw})


def _attention_reference(attn, x: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Grouped-query attention written out: separate q, k, v from the grouped rows, every key/value head
    repeated for its query heads, rotary positions, masked softmax."""
    B, T, _ = x.shape
    a, k, d = shape.n_head, shape.kv_heads, shape.head_dim
    r = a // k
    rows = attn.qkv.weight.view(k, r + 2, d, shape.n_embd)
    wq, wk, wv = rows[:, :r].reshape(a * d, -1), rows[:, r].reshape(k * d, -1), rows[:, r + 1].reshape(k * d, -1)
    q = (x @ wq.T).view(B, T, a, d)
    key = (x @ wk.T).view(B, T, k, d)
    v = (x @ wv.T).view(B, T, k, d)
    pos = torch.arange(T).float()
    inv = shape.rope_theta ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.outer(pos, inv)  # (T, d/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rotate(t):  # pairs (i, i + d/2) rotate by the angle of position·θ^(-2i/d)
        lo, hi = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat((lo * cos - hi * sin, lo * sin + hi * cos), dim=-1)

    q, key = rotate(q), rotate(key)
    key, v = key.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)  # query head i uses kv head i // r
    scores = torch.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, a * d)
    return y @ attn.proj.weight.T


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])  # multi-head, grouped-query, multi-query
def test_grouped_query_attention_with_rope_matches_the_written_out_formula(n_kv_head):
    shape = _shape(n_kv_head=n_kv_head)
    attn = GPT(shape, seed=1).blocks[0].attn
    x = torch.randn(2, 16, 64)
    assert attn.qkv.weight.shape == ((8 + 2 * n_kv_head) * 8, 64) and attn.qkv.bias is None
    torch.testing.assert_close(attn(x), _attention_reference(attn, x, shape), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    cos, sin = rope_tables(12, 8, 10000.0, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rope(q.expand(1, 12, 1, 8), cos, sin)[0, :, 0]  # the same query at every position
    rk = apply_rope(k.expand(1, 12, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(rq[5] @ rk[2], rq[9] @ rk[6], atol=1e-5)  # distance 3 both times
    assert torch.allclose(rq[0], q) and not torch.allclose(rq[1], q)  # position 0 is not rotated


def test_swiglu_mlp_is_down_of_silu_gate_times_up():
    shape = _shape()
    mlp = GPT(shape, seed=2).blocks[1].mlp
    f = shape.ffn_size
    assert f == swiglu_hidden(64) == 256 and mlp.fc1.weight.shape == (2 * f, 64)
    gate, up = mlp.fc1.weight[0::2], mlp.fc1.weight[1::2]  # rows alternate gate_j, up_j
    x = torch.randn(3, 5, 64)
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.fc2.weight.T
    torch.testing.assert_close(mlp(x), want)


def test_llama_sizes_follow_the_published_rule():
    assert swiglu_hidden(4096) == 11008  # Llama 2 7B
    assert ModelShape(1, 4096, 32, 8, 8, mlp="swiglu").ffn_size == 11008
    assert ModelShape(1, 4096, 32, 8, 8).ffn_size == 4 * 4096  # GELU: 4h


def test_rmsnorm_untied_head_and_no_biases():
    model = GPT(_shape(), seed=3)
    names = dict(model.named_parameters())
    assert "wpe.weight" not in names and "lm_head.weight" in names
    assert not any(name.endswith("bias") for name in names)
    assert isinstance(model.ln_f, torch.nn.RMSNorm) and torch.all(model.ln_f.weight == 1)
    assert not torch.equal(model.lm_head.weight, model.wte.weight)  # drawn under its own name
    idx = torch.randint(0, 96, (2, 16))
    logits = model(idx)
    model.lm_head.weight.data.mul_(2.0)  # the head is its own matrix: the embedding is unchanged
    torch.testing.assert_close(model(idx), 2 * logits)


def test_param_count_of_a_grouped_query_swiglu_block():
    shape = _shape()
    h, a, k, d, f = 64, 8, 2, 8, 256
    block = (a + 2 * k) * d * h + a * d * h + 3 * f * h + 2 * h  # q k v, o, gate up down, two RMSNorms
    assert shape.block_params() == block
    assert shape.params() == 2 * block + 2 * 96 * h + h  # embedding, head, final norm
    with torch.device("meta"):
        assert GPT(shape).num_params() == shape.params()
    assert shape.block_params(tp=2) == (block - 2 * h) / 2 + 2 * h  # norms replicated, the rest split
