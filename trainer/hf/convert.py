"""Conversion between this project's GPT and Hugging Face GPT-2: parameter names, layouts, config.

Pure functions on dicts of tensors; the files are read and written by ``trainer.export`` and
``trainer.import_hf``. The two models compute the same function; what differs is the storage:

    ours (trainer.model.gpt)                    HF GPT2LMHeadModel ("transformer." prefix)
    wte.weight            [V, h]                wte.weight                 [V, h]  (lm_head tied to it)
    wpe.weight            [s, h]                wpe.weight                 [s, h]
    blocks.i.ln_1.*                             h.i.ln_1.*
    blocks.i.attn.qkv     nn.Linear [3h, h]     h.i.attn.c_attn    Conv1D  [h, 3h]
        out features per head: [h0: q k v | h1: q k v | ...]   vs   [q all heads | k all heads | v all heads]
    blocks.i.attn.proj    nn.Linear [h, h]      h.i.attn.c_proj    Conv1D  [h, h]
    blocks.i.ln_2.*                             h.i.ln_2.*
    blocks.i.mlp.fc1      nn.Linear [4h, h]     h.i.mlp.c_fc       Conv1D  [h, 4h]
    blocks.i.mlp.fc2      nn.Linear [h, 4h]     h.i.mlp.c_proj     Conv1D  [4h, h]
    ln_f.*                                      ln_f.*

Conv1D computes ``x @ W + b``, so its weight is nn.Linear's transposed. Every conversion is a
permutation or a transpose: exact, so a round trip gives bit-identical tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HF_PREFIX = "transformer."
MODEL_KEYS = ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size")  # meta.json "model"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the GPT uses
# GELU's tanh approximation under its HF names; the GPT uses F.gelu(approximate="tanh").
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# (our suffix, HF suffix, transposed) inside one block; qkv is handled apart (it is also permuted).
_BLOCK_PARAMS = (
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc1.weight", "mlp.c_fc.weight", True),
    ("mlp.fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.fc2.weight", "mlp.c_proj.weight", True),
    ("mlp.fc2.bias", "mlp.c_proj.bias", False),
)
_TOP_PARAMS = ("wpe.weight", "ln_f.weight", "ln_f.bias")


class Unsupported(ValueError):
    """A model or checkpoint this conversion cannot represent; the message is one line with the fix."""


# --- shapes and configs -------------------------------------------------------------------------------


def gpt2_config(model: dict[str, int], eos_token_id: int | None) -> dict[str, Any]:
    """GPT2Config keyword arguments for a GPT of shape ``model`` (meta.json's "model").

    Dropout is 0: the shape does not record the training dropout, and an exported model is mostly
    evaluated; set the three *_pdrop values in config.json to fine-tune with dropout in HF.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": model["vocab_size"],
        "n_positions": model["seq_len"],
        "n_embd": model["n_embd"],
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_inner": None,  # 4h
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_token_id,  # the one special token <|endoftext|> plays both parts, as in GPT-2
        "eos_token_id": eos_token_id,
    }


# What config.json may leave out means GPT2Config's default; these are the defaults that matter here.
_GPT2_DEFAULTS: dict[str, Any] = {
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def model_shape(config: dict[str, Any]) -> dict[str, int]:
    """meta.json's "model" for an HF GPT-2 ``config`` (config.json's dict); Unsupported if this
    GPT cannot compute the same function. The tied head is checked on the weights (``check_tied``)."""
    if config.get("model_type") != "gpt2":
        raise Unsupported(f"model_type is {config.get('model_type')!r}, not 'gpt2'; only GPT-2 models convert")
    c = {**_GPT2_DEFAULTS, **config}
    missing = [k for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size") if k not in c]
    if missing:
        raise Unsupported(f"config.json lacks {', '.join(missing)}; give a complete GPT-2 config")
    h = c["n_embd"]
    why = _refusal(c)
    if why:
        raise Unsupported(f"{why}; only plain GPT-2 models convert")
    return {
        "n_layer": c["n_layer"],
        "n_embd": h,
        "n_head": c["n_head"],
        "seq_len": c["n_positions"],
        "vocab_size": c["vocab_size"],
    }


def _refusal(c: dict[str, Any]) -> str | None:
    """What in GPT-2 config ``c`` (defaults filled in) this GPT does not compute, or None."""
    h, act, eps = c["n_embd"], c["activation_function"], c["layer_norm_epsilon"]
    refusals = [
        (c["n_inner"] not in (None, 4 * h), f"n_inner={c['n_inner']} (this GPT's MLP is 4·n_embd={4 * h})"),
        (act not in TANH_GELUS, f"activation_function={act!r} (this GPT uses tanh GELU: {', '.join(TANH_GELUS)})"),
        (eps != LAYER_NORM_EPS, f"layer_norm_epsilon={eps} (this GPT uses {LAYER_NORM_EPS})"),
        (not c["scale_attn_weights"], "scale_attn_weights=false (this GPT scales by 1/sqrt(head_dim))"),
        (c["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx=true (not in this GPT)"),
        (c["reorder_and_upcast_attn"], "reorder_and_upcast_attn=true (not in this GPT)"),
        (c["add_cross_attention"], "add_cross_attention=true (this GPT is decoder-only)"),
        (c["n_head"] <= 0 or h % c["n_head"], f"n_embd={h} is not divisible by n_head={c['n_head']}"),
    ]
    return next((why for refused, why in refusals if refused), None)


# --- weights --------------------------------------------------------------------------------------


def _qkv_to_hf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Our fused QKV weight [3h, h] (or bias [3h]), per-head rows, -> HF c_attn (Conv1D: [h, 3h] or [3h])."""
    head_dim = t.shape[0] // (3 * n_head)
    grouped = t.reshape(n_head, 3, head_dim, *t.shape[1:]).transpose(0, 1)  # (3, nh, hd, [h])
    flat = grouped.reshape(t.shape)  # rows [q all heads | k | v]
    return flat.t().contiguous() if t.dim() == 2 else flat.contiguous()


def _qkv_from_hf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``_qkv_to_hf``."""
    rows = t.t() if t.dim() == 2 else t  # [3h, h] or [3h], rows [q all heads | k | v]
    head_dim = rows.shape[0] // (3 * n_head)
    per_head = rows.reshape(3, n_head, head_dim, *rows.shape[1:]).transpose(0, 1)  # (nh, 3, hd, [h])
    return per_head.reshape(rows.shape).contiguous()


def expected_shapes(model: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Our parameter names and full shapes for ``model`` (the keys of GPT(shape).state_dict())."""
    h, s, V = model["n_embd"], model["seq_len"], model["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (V, h),
        "wpe.weight": (s, h),
        "ln_f.weight": (h,),
        "ln_f.bias": (h,),
    }
    per_block = {
        "ln_1.weight": (h,), "ln_1.bias": (h,), "attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,),
        "attn.proj.weight": (h, h), "attn.proj.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
        "mlp.fc1.weight": (4 * h, h), "mlp.fc1.bias": (4 * h,), "mlp.fc2.weight": (h, 4 * h), "mlp.fc2.bias": (h,),
    }  # fmt: skip
    for i in range(model["n_layer"]):
        shapes.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return shapes


def check_ours(state: dict[str, torch.Tensor], model: dict[str, int]) -> None:
    """Raise Unsupported unless ``state`` holds exactly the GPT's parameters at ``model``'s shape."""
    check_shapes({name: tuple(t.shape) for name, t in state.items()}, model)


def check_shapes(shapes: dict[str, tuple[int, ...]], model: dict[str, int]) -> None:
    """``check_ours`` from the tensors' shapes alone (a checkpoint's index, before reading any tensor).

    ``wte.weight`` may have more rows than ``model["vocab_size"]``: tensor parallelism pads the
    vocabulary (``trainer.model.shape.padded_vocab``).
    """
    expected = expected_shapes(model)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise Unsupported(
            f"the weights do not match meta.json's model {model}: {what}; is meta.json from this checkpoint?"
        )
    for name, shape in expected.items():
        got = tuple(shapes[name])
        padded_wte = name == "wte.weight" and got[1:] == shape[1:] and got[0] >= shape[0]
        if got != shape and not padded_wte:
            raise Unsupported(
                f"{name} has shape {list(got)}, meta.json's model needs {list(shape)}; the checkpoint is inconsistent"
            )


def hf_plan(model: dict[str, int]) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(HF name, our name, conversion) for every tensor GPT2LMHeadModel stores, in its order: what
    ``to_hf`` does to a whole state dict, one tensor at a time (for writing a tensor at a time)."""
    vocab, heads = model["vocab_size"], model["n_head"]
    plan = [(f"{HF_PREFIX}wte.weight", "wte.weight", lambda t: t[:vocab].float().clone())]
    plan += [(f"{HF_PREFIX}{name}", name, _plain) for name in _TOP_PARAMS]
    for i in range(model["n_layer"]):
        ours, hf = f"blocks.{i}.", f"{HF_PREFIX}h.{i}."
        for suffix in ("weight", "bias"):
            plan.append(
                (f"{hf}attn.c_attn.{suffix}", f"{ours}attn.qkv.{suffix}", lambda t: _qkv_to_hf(t.float(), heads))
            )
        for our_suffix, hf_suffix, transposed in _BLOCK_PARAMS:
            plan.append((hf + hf_suffix, ours + our_suffix, _transposed if transposed else _plain))
    return plan


def ours_plan(model: dict[str, int]) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(our name, HF name, conversion): ``hf_plan`` backwards, one tensor at a time (``from_hf``'s work)."""
    heads = model["n_head"]
    plan = []
    for hf_name, ours, convert in hf_plan(model):
        if ".attn.c_attn." in hf_name:
            convert = lambda t: _qkv_from_hf(t.float(), heads)  # noqa: E731
        elif ours == "wte.weight":
            convert = _plain
        plan.append((ours, hf_name, convert))  # a transpose or a copy is its own inverse
    return plan


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.float().t().contiguous()


def to_hf(state: dict[str, torch.Tensor], model: dict[str, int]) -> dict[str, torch.Tensor]:
    """Our dense state dict -> GPT2LMHeadModel's, fp32, without ``lm_head.weight`` (tied to wte,
    which is how transformers itself saves GPT-2). Vocabulary padding rows are dropped: they are an
    artifact of the tensor-parallel layout, and the tp=1 model has ``model["vocab_size"]`` rows."""
    check_ours(state, model)
    return {hf: convert(state[ours]) for hf, ours, convert in hf_plan(model)}


def check_tied(hf_state: dict[str, torch.Tensor]) -> None:
    """Raise Unsupported when the HF model has an output head that is not its token embedding."""
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, hf_state[f"{HF_PREFIX}wte.weight"]):
        raise Unsupported("lm_head.weight differs from wte.weight (untied output head); this GPT ties them")


def from_hf(hf_state: dict[str, torch.Tensor], model: dict[str, int]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (``lm_head.weight`` optional, checked tied) -> ours, fp32."""
    check_tied(hf_state)
    missing = [k for k in _hf_names(model) if k not in hf_state]
    if missing:
        raise Unsupported(f"the HF weights lack {missing[:3]}; the model does not match its config.json")
    get = {k.removeprefix(HF_PREFIX): v.float() for k, v in hf_state.items()}
    out = {name: get[name].contiguous() for name in ("wte.weight", *_TOP_PARAMS)}
    for i in range(model["n_layer"]):
        ours, hf = f"blocks.{i}.", f"h.{i}."
        for suffix in ("weight", "bias"):
            out[f"{ours}attn.qkv.{suffix}"] = _qkv_from_hf(get[f"{hf}attn.c_attn.{suffix}"], model["n_head"])
        for our_suffix, hf_suffix, transposed in _BLOCK_PARAMS:
            t = get[hf + hf_suffix]
            out[ours + our_suffix] = (t.t() if transposed else t).contiguous()
    check_ours(out, model)
    return out


def _hf_names(model: dict[str, int]) -> list[str]:
    names = [f"{HF_PREFIX}{n}" for n in ("wte.weight", *_TOP_PARAMS)]
    for i in range(model["n_layer"]):
        names += [f"{HF_PREFIX}h.{i}.attn.c_attn.{s}" for s in ("weight", "bias")]
        names += [f"{HF_PREFIX}h.{i}.{hf}" for _, hf, _ in _BLOCK_PARAMS]
    return names
