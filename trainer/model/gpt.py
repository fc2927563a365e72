"""The decoder the trainer builds -- GPT-2/3 or Llama-style, as its ``ModelShape`` says -- written as
single-device code.

    idx (B, T) ─ wte (+ wpe) ─> [Block × n_layer] ─> norm_f ─> head ─> logits (B, T, V)
    Block:  x + attn(norm_1(x))  then  x + mlp(norm_2(x))        (pre-norm)

GPT-2: LayerNorm, learned positions (wpe), GELU MLP, biases, head tied to wte. Llama: RMSNorm, rotary
positions applied to q and k, SwiGLU MLP, grouped-query attention, no biases, an untied ``lm_head``.

Layers that tensor parallelism may split come from a ``LayerProvider``; this file knows nothing of
process groups, launchers or configs. Shapes in comments are per rank: with tensor parallelism the
head counts ``nh`` (query) and ``nkv`` (key/value) are the local ones (n_head / tp, n_kv_head / tp).

Activation recompute (Korthikanti et al. 2022), chosen by plain constructor arguments:
``recompute="selective"`` keeps no activations of the attention core (softmax(QKᵀ)·V, its dropout)
and recomputes it in backward; ``recompute="full"`` keeps only the input of every run of
``checkpoint_every`` blocks and recomputes the runs in backward. Both use torch's non-reentrant
checkpoint, which restores the RNG state, so dropout masks repeat and gradients are unchanged.
"""

from __future__ import annotations

import math
import zlib
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from trainer.model.kv_cache import KVCache
from trainer.model.layers import NORM_TYPES, DenseLayers, LayerProvider, mark_padding
from trainer.model.shape import RECOMPUTE, ModelShape


def make_norm(shape: ModelShape) -> nn.Module:
    if shape.norm == "rmsnorm":
        return nn.RMSNorm(shape.n_embd, eps=shape.norm_eps)
    return nn.LayerNorm(shape.n_embd, eps=shape.norm_eps, bias=shape.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: ModelShape, layers: LayerProvider, recompute_attention: bool = False):
        super().__init__()
        tp = layers.tp_size
        if shape.n_head % tp:
            raise ValueError(f"n_head={shape.n_head} must be divisible by the tensor-parallel size {tp}")
        if shape.kv_heads % tp or shape.n_head % shape.kv_heads:
            raise ValueError(f"n_kv_head={shape.kv_heads} must divide n_head={shape.n_head}, and tp={tp} divide it")
        self.n_kv_head = shape.kv_heads // tp  # key/value heads on this rank
        self.group = shape.n_head // shape.kv_heads  # query heads per key/value head
        self.head_dim = shape.head_dim
        self.rope_theta = shape.rope_theta if shape.position == "rope" else None
        # Fused QKV, laid out per key/value group as [g0: q…q k v | g1: q…q k v | ...] (``group`` query
        # heads, then the group's key and value head; [h0: q k v | ...] for multi-head attention), so a
        # split of the output features across tp ranks hands each rank whole groups, at any tp.
        self.qkv = layers.column(shape.n_embd, shape.qkv_features, bias=shape.bias)
        self.proj = layers.row(shape.n_head * shape.head_dim, shape.n_embd, bias=shape.bias)
        self.proj.residual_init = True
        self.dropout = shape.dropout
        self.resid_drop = nn.Dropout(shape.dropout)
        self.recompute_attention = recompute_attention  # selective recompute of the attention core
        # SDPA kernels training attention may use (trainer.runtime.speed.use_flash); None = torch chooses.
        self.sdpa_backends: list | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, h) -> (B, T, h). With a ``cache`` the T tokens sit at positions cache.length.. and attend
        to every cached position as well (block ``layer``'s keys and values are stored there)."""
        qkv = self.qkv(x)  # (B, T, nkv*(group+2)*hd)
        B, T = qkv.shape[:2]
        start = 0 if cache is None else cache.length
        grouped = qkv.view(B, T, self.n_kv_head, self.group + 2, self.head_dim)
        q = grouped[:, :, :, : self.group].flatten(2, 3)  # (B, T, nh, hd), head i in group i // group
        k, v = grouped[:, :, :, self.group], grouped[:, :, :, self.group + 1]  # each (B, T, nkv, hd)
        if self.rope_theta is not None:
            cos, sin = rope_tables(T, self.head_dim, self.rope_theta, x.device, start)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, start + T, hd)
        y = self._core(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        return self.resid_drop(self.proj(y))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if self.recompute_attention and self.training and torch.is_grad_enabled():
            # Only q, k, v are kept; the (B, nh, T, T) scores, probabilities and dropout mask -- the
            # 5as/h term of the activations -- are recomputed in backward.
            return checkpoint(_attention, q, k, v, dropout_p, self.sdpa_backends, use_reentrant=False)
        return _attention(q, k, v, dropout_p, self.sdpa_backends)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, backends: list | None = None
) -> torch.Tensor:
    # Flash / memory-efficient kernels on GPU, the math kernel on CPU. Query head i attends with key/value
    # head i // (nh / nkv) (grouped-query attention); fewer key/value heads are not copied out first.
    gqa = q.shape[1] != k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk or Tq == 1:  # training and a cache's prefill: causal; one new token sees every cached one
        # ``backends`` pins the kernel (flash on GPUs): a call it cannot run fails rather than falls back.
        with sdpa_kernel(backends) if backends else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, dropout_p=dropout_p, enable_gqa=gqa)
    # Several new tokens after cached ones: query i sits at position Tk - Tq + i.
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def rope_tables(
    T: int, head_dim: int, theta: float, device: torch.device, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos·θ^(-2i/d) of positions start..start+T-1, (T, 1, hd), in fp32,
    each angle twice: the first
    and second half of a head's features form the rotated pairs (the "rotate half" convention of
    GPT-NeoX and Hugging Face's Llama, so q and k weights convert without a permutation)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(start, start + T, device=device).float(), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (T, 1, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, heads, hd) queries or keys by their position: x·cos + rotate_half(x)·sin."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class MLP(nn.Module):
    """GELU: fc2(gelu(fc1(x))). SwiGLU: fc2(silu(gate) · up), with gate and up one column-parallel fc1 whose
    output features alternate [gate_0, up_0, gate_1, up_1, ...]: any split of them over tp ranks hands
    each rank matching gate and up features, so the MLP costs the same collectives as the GELU one."""

    def __init__(self, shape: ModelShape, layers: LayerProvider):
        super().__init__()
        self.swiglu = shape.mlp == "swiglu"
        f = shape.ffn_size
        self.fc1 = layers.column(shape.n_embd, 2 * f if self.swiglu else f, bias=shape.bias)
        self.fc2 = layers.row(f, shape.n_embd, bias=shape.bias)
        self.fc2.residual_init = True
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.swiglu:
            gate, up = hidden.unflatten(-1, (-1, 2)).unbind(-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")  # GPT-2's GELU
        return self.drop(self.fc2(hidden))


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layers: LayerProvider, recompute_attention: bool = False):
        super().__init__()
        self.ln_1 = make_norm(shape)
        self.attn = CausalSelfAttention(shape, layers, recompute_attention)
        self.ln_2 = make_norm(shape)
        self.mlp = MLP(shape, layers)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self,
        shape: ModelShape,
        layers: LayerProvider | None = None,
        seed: int | None = 0,  # None: leave the weights to init_weights (e.g. once ZeRO-3 partitioned them)
        recompute: str = "none",
        checkpoint_every: int = 1,
    ):
        super().__init__()
        if recompute not in RECOMPUTE or checkpoint_every < 1:
            raise ValueError(f"recompute={recompute!r}, checkpoint_every={checkpoint_every}: need {RECOMPUTE}, >= 1")
        self.shape = shape
        self.recompute, self.checkpoint_every = recompute, checkpoint_every
        # The output head and the loss in one pass over chunks of tokens (trainer.model.fused_loss) rather
        # than the whole logits then the loss: the same loss and gradients, less memory. Off by default.
        self.fused_loss = False
        self.layers = layers or DenseLayers()
        self.wte = self.layers.embedding(shape.vocab_size, shape.n_embd)
        mark_padding(self.wte, shape.real_vocab)
        if shape.position == "learned":
            self.wpe = nn.Embedding(shape.seq_len, shape.n_embd)
        self.drop = nn.Dropout(shape.dropout)
        selective = recompute == "selective"
        self.blocks = nn.ModuleList(Block(shape, self.layers, selective) for _ in range(shape.n_layer))
        self.ln_f = make_norm(shape)
        if not shape.tie_embeddings:
            self.lm_head = self.layers.head(shape.vocab_size, shape.n_embd)
            mark_padding(self.lm_head, shape.real_vocab)
        if seed is not None and self.wte.weight.device.type != "meta":
            self.init_weights(seed)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) token ids -> mean loss against targets (B, T), or logits if targets is None.

        With a ``cache`` (decoding, dense model only) the tokens continue the cached ones: they sit at
        positions cache.length.., see them, and are cached in turn."""
        start = 0 if cache is None else cache.length
        x = self.drop(embed(self.wte, getattr(self, "wpe", None), idx, start))  # (B, T, h)
        if cache is None:
            x = self._run_blocks(self.layers.to_block_layout(x))
        else:
            for layer, block in enumerate(self.blocks):
                x = block(x, cache, layer)
            cache.length += idx.shape[1]
        x = self.layers.from_block_layout(self.ln_f(x))
        head = getattr(self, "lm_head", self.wte)
        if targets is not None and self.fused_loss:
            return self.layers.fused_head_loss(x, head, targets)
        logits = self.layers.lm_logits(x, head)  # (B, T, V) or its vocab shard
        if targets is None:
            return logits
        return self.layers.cross_entropy(logits, targets)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute == "full" and self.training and torch.is_grad_enabled()):
            return _sequential(self.blocks, x)
        k = self.checkpoint_every
        for start in range(0, len(self.blocks), k):
            # Only this run's input is kept; its blocks run again in backward.
            x = checkpoint(_sequential, self.blocks[start : start + k], x, use_reentrant=False)
        return x

    def num_params(self) -> int:
        """Parameters of the full model (shards counted at their full size)."""
        return sum(_full_shape(module, name).numel() for _, module, name, _ in _leaf_params(self))

    def init_weights(self, seed: int) -> None:
        init_weights(self, seed, self.shape.n_layer)


def embed(wte: nn.Module, wpe: nn.Module | None, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token embeddings plus learned position embeddings (positions start..), if the model has them:
    (B, T) -> (B, T, h)."""
    x = wte(idx)
    return x if wpe is None else x + wpe(torch.arange(start, start + idx.shape[1], device=idx.device))


def _sequential(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, n_layer: int, prefix: str = "", whole=None) -> None:
    """GPT-2 initialisation of ``module``'s parameters, independent of the parallel layout.

    Every parameter is drawn at its full size from a generator seeded by (seed, its name in the
    whole GPT) and then cut to this rank's shard, so the gathered weights are the same at any tp
    or pp and however the modules were constructed. ``prefix`` is ``module``'s path inside the
    GPT (a pipeline stage holding block 3 passes "blocks.3"). Weights ~ N(0, 0.02), residual
    projections ~ N(0, 0.02/sqrt(2·n_layer)), biases 0, norms (1, 0).

    ``whole(param)``, if given, is a context in which a partitioned parameter is whole and writable
    (ZeRO-3's ``GatheredParameters``): parameters are then drawn one at a time.
    """
    for mod_name, sub, name, param in _leaf_params(module):
        qualified = ".".join(part for part in (prefix, mod_name, name) if part)
        with whole(param) if whole is not None else nullcontext():
            _init_param(sub, name, param, qualified, seed, n_layer)


def _init_param(sub: nn.Module, name: str, param: nn.Parameter, qualified: str, seed: int, n_layer: int) -> None:
    if isinstance(sub, NORM_TYPES):
        param.fill_(1.0 if name == "weight" else 0.0)
        return
    if name == "bias":
        param.zero_()
        return
    std = 0.02 / math.sqrt(2 * n_layer) if getattr(sub, "residual_init", False) else 0.02
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(qualified.encode()))
    full = torch.empty(_full_shape(sub, name)).normal_(0.0, std, generator=gen)
    param.copy_(sub.shard_param(name, full) if hasattr(sub, "shard_param") else full)


def _leaf_params(model: nn.Module):
    """(module path, module, local name, parameter) for every parameter."""
    for mod_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            yield mod_name, module, name, param


def _full_shape(module: nn.Module, name: str) -> torch.Size:
    if hasattr(module, "full_param_shape"):
        return module.full_param_shape(name)
    param = getattr(module, name)
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps a partitioned parameter's shape aside
