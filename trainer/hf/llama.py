"""The Llama family: this project's Llama-style models <-> Hugging Face ``LlamaForCausalLM``.

    ours (trainer.model.gpt)                          HF LlamaForCausalLM
    wte.weight              [V, h]                    model.embed_tokens.weight            [V, h]
    blocks.i.ln_1.weight    RMSNorm                   model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv       [(a+2k)·d, h]             model.layers.i.self_attn.{q,k,v}_proj  [a·d | k·d | k·d, h]
        rows per key/value group g:  [q_{g·r} … q_{g·r+r-1} k_g v_g]  (r = a/k query heads per group)
    blocks.i.attn.proj      [h, a·d]                  model.layers.i.self_attn.o_proj
    blocks.i.ln_2.weight    RMSNorm                   model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.fc1        [2f, h]                   model.layers.i.mlp.{gate,up}_proj    [f, h] each
        rows interleaved: 2j = gate_j, 2j+1 = up_j
    blocks.i.mlp.fc2        [h, f]                    model.layers.i.mlp.down_proj
    ln_f.weight             RMSNorm                   model.norm.weight
    lm_head.weight          [V, h] (untied only)      lm_head.weight (tie_word_embeddings=false only)

Biases (``bias=true``) follow their weights' rows: HF's ``attention_bias`` (q, k, v, o) and ``mlp_bias``
(gate, up, down) together. Both models use nn.Linear's [out, in], and the same "rotate half" rotary
embeddings, so no transposes and no q/k permutation: the conversion is slicing and interleaving only.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.hf.convert import SAME, VOCAB, Entry, Family, Transform, Unsupported
from trainer.model.shape import ModelShape

HF_ACT = "silu"  # SwiGLU's gate activation


def _split_qkv(shape: ModelShape, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Our fused QKV weight (or bias), rows grouped per key/value head, -> HF's q, k, v projections."""
    k, d = shape.kv_heads, shape.head_dim
    r, rest = shape.n_head // k, t.shape[1:]
    grouped = t.reshape(k, r + 2, d, *rest)  # (group, [q…q k v], d, [h])
    q = grouped[:, :r].reshape(k * r * d, *rest)  # query head g·r + j is the j-th of group g
    return q, grouped[:, r].reshape(k * d, *rest), grouped[:, r + 1].reshape(k * d, *rest)


def _join_qkv(shape: ModelShape, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_split_qkv``."""
    k, d = shape.kv_heads, shape.head_dim
    r, rest = shape.n_head // k, q.shape[1:]
    parts = (q.reshape(k, r, d, *rest), key.reshape(k, 1, d, *rest), value.reshape(k, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


QKV = Transform(_split_qkv, _join_qkv)
# fc1's interleaved rows [gate_0, up_0, gate_1, up_1, ...] <-> gate_proj, up_proj.
SWIGLU = Transform(lambda s, t: (t[0::2], t[1::2]), lambda s, gate, up: torch.stack((gate, up), dim=1).flatten(0, 1))

_TOP: tuple[Entry, ...] = (
    ("wte.weight", ("model.embed_tokens.weight",), VOCAB),
    ("ln_f.weight", ("model.norm.weight",), SAME),
    ("lm_head.weight", ("lm_head.weight",), VOCAB),
)
_BLOCK: tuple[Entry, ...] = (
    ("ln_1.weight", ("input_layernorm.weight",), SAME),
    ("attn.qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    ("attn.qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
    ("attn.proj.weight", ("self_attn.o_proj.weight",), SAME),
    ("attn.proj.bias", ("self_attn.o_proj.bias",), SAME),
    ("ln_2.weight", ("post_attention_layernorm.weight",), SAME),
    ("mlp.fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), SWIGLU),
    ("mlp.fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), SWIGLU),
    ("mlp.fc2.weight", ("mlp.down_proj.weight",), SAME),
    ("mlp.fc2.bias", ("mlp.down_proj.bias",), SAME),
)


def llama_config(shape: ModelShape, eos_token_id: int | None) -> dict[str, Any]:
    """LlamaConfig keyword arguments for a Llama-style model of ``shape``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.n_embd,
        "intermediate_size": shape.ffn_size,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": HF_ACT,
        "max_position_embeddings": shape.seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "attention_bias": shape.bias,
        "mlp_bias": shape.bias,
        "attention_dropout": 0.0,  # as GPT-2's export: dropout is not recorded in the shape
        "pretraining_tp": 1,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": eos_token_id,  # <|endoftext|> plays both parts, as in the GPT-2 export
        "eos_token_id": eos_token_id,
    }


def _cannot_represent(shape: ModelShape) -> list[str]:
    checks = [
        (shape.norm != "rmsnorm", f"norm={shape.norm}"),
        (shape.mlp != "swiglu", f"mlp={shape.mlp}"),
        (shape.position != "rope", f"position={shape.position}"),
    ]
    return [why for refused, why in checks if refused]


# LlamaConfig's defaults for what config.json may leave out (older files lack the newer fields).
_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "num_key_value_heads": None,  # = num_attention_heads
    "head_dim": None,  # = hidden_size / num_attention_heads
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pretraining_tp": 1,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,  # transformers 4.x: top level; 5.x: in rope_parameters
    "rope_scaling": None,
    "rope_parameters": None,
}
_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def _model_meta(config: dict[str, Any]) -> dict[str, Any]:
    """meta.json's "model" (a full ``ModelShape.meta()``) for an HF Llama ``config``; Unsupported for
    what this model does not compute."""
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    missing = [k for k in _SIZES if k not in c]
    if missing:
        raise Unsupported(f"config.json (model_type 'llama') lacks {', '.join(missing)}; give a complete Llama config")
    why = _refusal(c)
    if why:
        raise Unsupported(f"{why}; only plain Llama models (SiLU SwiGLU, unscaled rotary embeddings) convert")
    shape = ModelShape(
        n_layer=int(c["num_hidden_layers"]),
        n_embd=int(c["hidden_size"]),
        n_head=int(c["num_attention_heads"]),
        seq_len=int(c["max_position_embeddings"]),
        vocab_size=int(c["vocab_size"]),
        n_kv_head=int(c["num_key_value_heads"] or c["num_attention_heads"]),
        ffn_hidden=int(c["intermediate_size"]),
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=float(c["rms_norm_eps"]),
        position="rope",
        rope_theta=float(_rope(c)[1]),
        bias=bool(c["attention_bias"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
    )
    return shape.meta()


def _rope(c: dict[str, Any]) -> tuple[str | None, float]:
    """(why the rotary embeddings are not plain ones, or None; their base θ). transformers 5 writes
    ``rope_parameters`` {rope_type, rope_theta}; older files ``rope_theta`` and ``rope_scaling``."""
    params = c["rope_parameters"] or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", c["rope_scaling"] or {})):
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            return f"{key} has rope_type {kind!r} (this model computes unscaled rotary embeddings)", 0.0
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        return (
            f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} (this model rotates whole heads)",
            0.0,
        )
    return None, params.get("rope_theta", c["rope_theta"])


def _refusal(c: dict[str, Any]) -> str | None:
    """What in Llama config ``c`` (defaults filled in) this model does not compute, or None."""
    h, a = c["hidden_size"], c["num_attention_heads"]
    k = c["num_key_value_heads"] or a
    head_dim = c["head_dim"]
    refusals = [
        (a <= 0 or h % a, f"hidden_size={h} is not divisible by num_attention_heads={a}"),
        (head_dim not in (None, h // max(a, 1)), f"head_dim={head_dim} (this model's is hidden_size/heads={h // a})"),
        (k <= 0 or a % k, f"num_key_value_heads={k} does not divide num_attention_heads={a}"),
        (c["hidden_act"] != HF_ACT, f"hidden_act={c['hidden_act']!r} (this model's SwiGLU gate is {HF_ACT!r})"),
        (c["pretraining_tp"] != 1, f"pretraining_tp={c['pretraining_tp']} (need 1)"),
        (
            bool(c["attention_bias"]) != bool(c["mlp_bias"]),
            f"attention_bias={c['attention_bias']} with mlp_bias={c['mlp_bias']} (this model has biases in all "
            "linear layers or in none)",
        ),
        (_rope(c)[0] is not None, _rope(c)[0]),
    ]
    return next((why for refused, why in refusals if refused), None)


LLAMA = Family(
    name="Llama",
    summary="Llama (rmsnorm, swiglu, rope; any n_kv_head, bias, tie_embeddings)",
    model_type="llama",
    hf_class="LlamaForCausalLM",
    config_class="LlamaConfig",
    top=_TOP,
    block=_BLOCK,
    block_prefix="model.layers.",
    cannot_represent=_cannot_represent,
    hf_config=llama_config,
    model_meta=_model_meta,
)
