"""Conversion between this project's models and Hugging Face's: parameter names, layouts, configs.

Pure functions on dicts of tensors; the files are read and written by ``trainer.export`` and
``trainer.import_hf``. Two families convert, a ``Family`` each: GPT-2 (``GPT2LMHeadModel``, here) and
Llama (``LlamaForCausalLM``, ``trainer.hf.llama``). A family is its config mapping plus one table of
(our name, HF names, ``Transform``) entries; what is built on the tables -- the plans that convert a
tensor at a time, whole-dict conversion, the shape checks, choosing the family of a model or a
config.json -- is shared here. Every transform is a slice, a permutation or a transpose: exact, so a
round trip gives bit-identical tensors.

GPT-2 (HF names under "transformer."):

    ours (trainer.model.gpt)                    HF GPT2LMHeadModel
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

Conv1D computes ``x @ W + b``, so its weight is nn.Linear's transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from trainer.model.gpt import GPT
from trainer.model.shape import ModelShape

HF_PREFIX = "transformer."
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the GPT-2 conversion keeps
# GELU's tanh approximation under its HF names; the GPT uses F.gelu(approximate="tanh").
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Our parameters whose rows are the vocabulary: tensor parallelism may pad them (extra rows at the end).
VOCAB_ROWS = ("wte.weight", "lm_head.weight")

Tensor = torch.Tensor
Conversion = tuple[str, tuple[str, ...], Callable[..., Tensor]]  # (target name, source names, fn(*sources))


class Unsupported(ValueError):
    """A model or checkpoint this conversion cannot represent; the message is one line with the fix."""


class Transform(NamedTuple):
    """How one of our tensors maps to its HF tensors (fp32 in, views allowed out)."""

    to_hf: Callable[..., tuple[Tensor, ...]]  # (shape, ours) -> the HF tensors, in the entry's order
    from_hf: Callable[..., Tensor]  # (shape, *HF tensors) -> ours


SAME = Transform(lambda s, t: (t,), lambda s, t: t)
TRANSPOSED = Transform(lambda s, t: (t.t(),), lambda s, t: t.t())
VOCAB = Transform(lambda s, t: (t[: s.vocab_size],), lambda s, t: t)  # drops the tensor-parallel padding rows

# A table entry: (our name, its HF names, transform). Top-level names are whole; a block's are suffixes of
# "blocks.{i}." (ours) and of the family's ``block_prefix`` + "{i}." (HF).
Entry = tuple[str, tuple[str, ...], Transform]


@dataclass(frozen=True)
class Family:
    name: str  # "GPT-2"
    summary: str  # the architecture, for refusals
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers model class
    config_class: str  # its config class
    top: tuple[Entry, ...]
    block: tuple[Entry, ...]
    block_prefix: str
    cannot_represent: Callable[[ModelShape], list[str]]  # what of a shape this family has no place for
    hf_config: Callable[[ModelShape, int | None], dict[str, Any]]  # config class kwargs (eos id given)
    model_meta: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> meta.json "model"; Unsupported
    # Checks of the HF tensors beyond their names and shapes: (read(name), the names present).
    check_weights: Callable[[Callable[[str], Tensor], Collection[str]], None] = lambda read, names: None


# --- GPT-2 ----------------------------------------------------------------------------------------


def _qkv_to_hf(t: Tensor, n_head: int) -> Tensor:
    """Our fused QKV weight [3h, h] (or bias [3h]), per-head rows, -> HF c_attn (Conv1D: [h, 3h] or [3h])."""
    head_dim = t.shape[0] // (3 * n_head)
    grouped = t.reshape(n_head, 3, head_dim, *t.shape[1:]).transpose(0, 1)  # (3, nh, hd, [h])
    flat = grouped.reshape(t.shape)  # rows [q all heads | k | v]
    return flat.t() if t.dim() == 2 else flat


def _qkv_from_hf(t: Tensor, n_head: int) -> Tensor:
    """Inverse of ``_qkv_to_hf``."""
    rows = t.t() if t.dim() == 2 else t  # [3h, h] or [3h], rows [q all heads | k | v]
    head_dim = rows.shape[0] // (3 * n_head)
    per_head = rows.reshape(3, n_head, head_dim, *rows.shape[1:]).transpose(0, 1)  # (nh, 3, hd, [h])
    return per_head.reshape(rows.shape)


GPT2_QKV = Transform(lambda s, t: (_qkv_to_hf(t, s.n_head),), lambda s, t: _qkv_from_hf(t, s.n_head))

_GPT2_TOP: tuple[Entry, ...] = (
    ("wte.weight", (f"{HF_PREFIX}wte.weight",), VOCAB),
    ("wpe.weight", (f"{HF_PREFIX}wpe.weight",), SAME),
    ("ln_f.weight", (f"{HF_PREFIX}ln_f.weight",), SAME),
    ("ln_f.bias", (f"{HF_PREFIX}ln_f.bias",), SAME),
)
_GPT2_BLOCK: tuple[Entry, ...] = (
    ("attn.qkv.weight", ("attn.c_attn.weight",), GPT2_QKV),
    ("attn.qkv.bias", ("attn.c_attn.bias",), GPT2_QKV),
    ("ln_1.weight", ("ln_1.weight",), SAME),
    ("ln_1.bias", ("ln_1.bias",), SAME),
    ("attn.proj.weight", ("attn.c_proj.weight",), TRANSPOSED),
    ("attn.proj.bias", ("attn.c_proj.bias",), SAME),
    ("ln_2.weight", ("ln_2.weight",), SAME),
    ("ln_2.bias", ("ln_2.bias",), SAME),
    ("mlp.fc1.weight", ("mlp.c_fc.weight",), TRANSPOSED),
    ("mlp.fc1.bias", ("mlp.c_fc.bias",), SAME),
    ("mlp.fc2.weight", ("mlp.c_proj.weight",), TRANSPOSED),
    ("mlp.fc2.bias", ("mlp.c_proj.bias",), SAME),
)


def gpt2_config(shape: ModelShape, eos_token_id: int | None) -> dict[str, Any]:
    """GPT2Config keyword arguments for a GPT-2 of ``shape``.

    Dropout is 0: the shape does not record the training dropout, and an exported model is mostly
    evaluated; set the three *_pdrop values in config.json to fine-tune with dropout in HF.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": shape.vocab_size,
        "n_positions": shape.seq_len,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
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


def _gpt2_cannot_represent(shape: ModelShape) -> list[str]:
    h, a = shape.n_embd, shape.n_head
    checks = [
        (shape.norm != "layernorm", f"norm={shape.norm}"),
        (shape.mlp != "gelu", f"mlp={shape.mlp}"),
        (shape.position != "learned", f"position={shape.position}"),
        (shape.kv_heads != a, f"n_kv_head={shape.kv_heads} (GPT-2 has n_head={a} key/value heads)"),
        (shape.ffn_size != 4 * h, f"ffn_hidden={shape.ffn_size} (GPT-2's MLP is 4·n_embd={4 * h})"),
        (shape.norm_eps != LAYER_NORM_EPS, f"norm_eps={shape.norm_eps} (the GPT-2 conversion uses {LAYER_NORM_EPS})"),
        (not shape.bias, "bias=false"),
        (not shape.tie_embeddings, "tie_embeddings=false (GPT-2's head is its token embedding)"),
    ]
    return [why for refused, why in checks if refused]


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


def _gpt2_model_meta(config: dict[str, Any]) -> dict[str, int]:
    """meta.json's "model" for an HF GPT-2 ``config``: the sizes (the architecture is GPT-2's, the
    defaults). The tied head is checked on the weights (``check_tied``)."""
    c = {**_GPT2_DEFAULTS, **config}
    missing = [k for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size") if k not in c]
    if missing:
        raise Unsupported(f"config.json lacks {', '.join(missing)}; give a complete GPT-2 config")
    why = _gpt2_refusal(c)
    if why:
        raise Unsupported(f"{why}; only plain GPT-2 models convert")
    return {
        "n_layer": c["n_layer"],
        "n_embd": c["n_embd"],
        "n_head": c["n_head"],
        "seq_len": c["n_positions"],
        "vocab_size": c["vocab_size"],
    }


def _gpt2_refusal(c: dict[str, Any]) -> str | None:
    """What in GPT-2 config ``c`` (defaults filled in) the GPT-2 conversion does not compute, or None."""
    h, act, eps = c["n_embd"], c["activation_function"], c["layer_norm_epsilon"]
    refusals = [
        (c["n_inner"] not in (None, 4 * h), f"n_inner={c['n_inner']} (the GPT-2 conversion's MLP is 4·n_embd={4 * h})"),
        (act not in TANH_GELUS, f"activation_function={act!r} (this GPT uses tanh GELU: {', '.join(TANH_GELUS)})"),
        (eps != LAYER_NORM_EPS, f"layer_norm_epsilon={eps} (the GPT-2 conversion uses {LAYER_NORM_EPS})"),
        (not c["scale_attn_weights"], "scale_attn_weights=false (this GPT scales by 1/sqrt(head_dim))"),
        (c["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx=true (not in this GPT)"),
        (c["reorder_and_upcast_attn"], "reorder_and_upcast_attn=true (not in this GPT)"),
        (c["add_cross_attention"], "add_cross_attention=true (this GPT is decoder-only)"),
        (c["n_head"] <= 0 or h % c["n_head"], f"n_embd={h} is not divisible by n_head={c['n_head']}"),
    ]
    return next((why for refused, why in refusals if refused), None)


def check_tied(read: Callable[[str], Tensor], names: Collection[str]) -> None:
    """Raise Unsupported when a GPT-2 has an output head that is not its token embedding."""
    wte = f"{HF_PREFIX}wte.weight"
    if "lm_head.weight" in names and wte in names and not torch.equal(read("lm_head.weight"), read(wte)):
        raise Unsupported("lm_head.weight differs from wte.weight (untied output head); GPT-2 here ties them")


GPT2 = Family(
    name="GPT-2",
    summary="GPT-2 (layernorm, gelu MLP of 4·n_embd, learned positions, biases, tied head)",
    model_type="gpt2",
    hf_class="GPT2LMHeadModel",
    config_class="GPT2Config",
    top=_GPT2_TOP,
    block=_GPT2_BLOCK,
    block_prefix=f"{HF_PREFIX}h.",
    cannot_represent=_gpt2_cannot_represent,
    hf_config=gpt2_config,
    model_meta=_gpt2_model_meta,
    check_weights=check_tied,
)


# --- choosing the family ----------------------------------------------------------------------------


def families() -> tuple[Family, ...]:
    from trainer.hf.llama import LLAMA  # it builds on this module's helpers

    return (GPT2, LLAMA)


def family_of(shape: ModelShape) -> Family:
    """The HF family that represents ``shape`` exactly; Unsupported (naming what does not fit the nearest
    family) for any other mix of architecture fields."""
    reasons = {f.name: f.cannot_represent(shape) for f in families()}
    fitting = [f for f in families() if not reasons[f.name]]
    if fitting:
        return fitting[0]
    near = min(families(), key=lambda f: len(reasons[f.name]))
    raise Unsupported(
        f"{near.hf_class}, the nearest Hugging Face model, cannot represent this model's "
        f"{', '.join(reasons[near.name])}; export needs {' or '.join(f.summary for f in families())}"
    )


def family_for(config: dict[str, Any]) -> Family:
    """The family of an HF config.json (its model_type); Unsupported for any other model."""
    for family in families():
        if config.get("model_type") == family.model_type:
            return family
    names = " and ".join(f"{f.name} ({f.model_type!r})" for f in families())
    raise Unsupported(f"model_type is {config.get('model_type')!r}; only {names} models convert")


def model_shape(config: dict[str, Any]) -> dict[str, Any]:
    """meta.json's "model" for an HF ``config`` (config.json's dict); Unsupported if this model cannot
    compute the same function."""
    return family_for(config).model_meta(config)


# --- tables to plans --------------------------------------------------------------------------------


def our_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Our parameter names and full shapes for ``shape``: the model's own state dict, built on the meta
    device (no memory)."""
    with torch.device("meta"):
        model = GPT(shape, seed=None)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def entries(family: Family, shape: ModelShape) -> list[Entry]:
    """``family``'s table with whole names, for the parameters a model of ``shape`` has (no biases
    without ``bias``, no ``lm_head`` when tied, ...), in the order HF stores them."""
    ours = our_shapes(shape)
    table = list(family.top)
    for i in range(shape.n_layer):
        hf_block = f"{family.block_prefix}{i}."
        table += [(f"blocks.{i}.{n}", tuple(hf_block + h for h in hf), how) for n, hf, how in family.block]
    table = [entry for entry in table if entry[0] in ours]
    uncovered = set(ours) - {name for name, _, _ in table}
    if uncovered:  # a table out of step with the model: a bug here, not bad input
        raise RuntimeError(f"the {family.name} table lacks {sorted(uncovered)[:3]}")
    return table


def hf_plan(shape: ModelShape, family: Family | None = None) -> list[Conversion]:
    """(HF name, (our name,), conversion) for every tensor the HF model stores: ``to_hf`` one tensor at a
    time (for writing a tensor at a time)."""
    family = family or family_of(shape)
    plan: list[Conversion] = []
    for ours, hf_names, how in entries(family, shape):
        for j, hf_name in enumerate(hf_names):
            plan.append((hf_name, (ours,), lambda t, how=how, j=j: how.to_hf(shape, t.float())[j].contiguous()))
    return plan


def ours_plan(shape: ModelShape, family: Family | None = None) -> list[Conversion]:
    """(our name, HF names, conversion): ``hf_plan`` backwards, one of our tensors at a time."""
    family = family or family_of(shape)
    return [
        (ours, hf_names, lambda *ts, how=how: how.from_hf(shape, *(t.float() for t in ts)).contiguous())
        for ours, hf_names, how in entries(family, shape)
    ]


def hf_shapes(shape: ModelShape, family: Family | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor's shape, known before any is read (a safetensors header comes first)."""
    meta = {name: torch.empty(dims, device="meta") for name, dims in our_shapes(shape).items()}
    return {hf_name: tuple(convert(meta[ours]).shape) for hf_name, (ours,), convert in hf_plan(shape, family)}


# --- checks and whole state dicts ---------------------------------------------------------------------


def check_shapes(shapes: dict[str, tuple[int, ...]], shape: ModelShape) -> None:
    """Raise Unsupported unless ``shapes`` (a checkpoint's index, before reading any tensor) are exactly
    the model's parameters at ``shape``. The vocabulary rows (``VOCAB_ROWS``) may be more than
    ``shape.vocab_size``: tensor parallelism pads the vocabulary (``trainer.model.shape.padded_vocab``)."""
    expected = our_shapes(shape)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise Unsupported(
            f"the weights do not match meta.json's model {shape.meta()}: {what}; is meta.json from this checkpoint?"
        )
    for name, want in expected.items():
        got = tuple(shapes[name])
        padded = name in VOCAB_ROWS and got[1:] == want[1:] and got[0] >= want[0]
        if got != want and not padded:
            raise Unsupported(
                f"{name} has shape {list(got)}, meta.json's model needs {list(want)}; the checkpoint is inconsistent"
            )


def check_hf_shapes(shapes: dict[str, tuple[int, ...]], shape: ModelShape, family: Family) -> None:
    """Raise Unsupported when an HF tensor's shape is not what the config says (before reading it)."""
    for name, want in hf_shapes(shape, family).items():
        got = tuple(shapes[name])
        if got != want:
            raise Unsupported(f"{name} has shape {list(got)}, config.json needs {list(want)}; the weights do not match")


def to_hf(state: dict[str, Tensor], shape: ModelShape) -> dict[str, Tensor]:
    """Our dense state dict -> the HF model's, fp32, as transformers saves it (no tied head). Vocabulary
    padding rows are dropped: they are an artifact of the tensor-parallel layout, and the tp=1 model has
    ``shape.vocab_size`` rows."""
    family = family_of(shape)
    check_shapes({name: tuple(t.shape) for name, t in state.items()}, shape)
    return {hf: convert(*(state[s] for s in sources)) for hf, sources, convert in hf_plan(shape, family)}


def from_hf(hf_state: dict[str, Tensor], shape: ModelShape, family: Family | None = None) -> dict[str, Tensor]:
    """The HF model's state dict -> ours, fp32 (a tied head, if present, is checked or ignored)."""
    family = family or family_of(shape)
    family.check_weights(hf_state.__getitem__, hf_state.keys())
    plan = ours_plan(shape, family)
    missing = [name for _, sources, _ in plan for name in sources if name not in hf_state]
    if missing:
        raise Unsupported(f"the HF weights lack {missing[:3]}; the model does not match its config.json")
    check_hf_shapes({k: tuple(t.shape) for k, t in hf_state.items()}, shape, family)
    return {ours: convert(*(hf_state[s] for s in sources)) for ours, sources, convert in plan}
