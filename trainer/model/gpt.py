"""GPT-2/3 style decoder, written as single-device code.

    idx (B, T) ─ wte + wpe ─> [Block × n_layer] ─> ln_f ─> head tied to wte ─> logits (B, T, V)
    Block:  x + attn(ln_1(x))  then  x + mlp(ln_2(x))        (pre-LayerNorm)

Layers that tensor parallelism may split come from a ``LayerProvider``; this file knows nothing of
process groups, launchers or configs. Shapes in comments are per rank: with tensor parallelism the
head count ``nh`` is the local one (n_head / tp).

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
from torch.utils.checkpoint import checkpoint

from trainer.model.layers import DenseLayers, LayerProvider
from trainer.model.shape import RECOMPUTE, ModelShape


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: ModelShape, layers: LayerProvider, recompute_attention: bool = False):
        super().__init__()
        if shape.n_head % layers.tp_size:
            raise ValueError(f"n_head={shape.n_head} must be divisible by the tensor-parallel size {layers.tp_size}")
        self.n_head = shape.n_head // layers.tp_size  # heads on this rank
        self.head_dim = shape.n_embd // shape.n_head
        # Fused QKV, laid out per head as [h0: q k v | h1: q k v | ...] so that a split of the
        # output features across tp ranks hands each rank whole heads, at any tp.
        self.qkv = layers.column(shape.n_embd, 3 * shape.n_embd)
        self.proj = layers.row(shape.n_embd, shape.n_embd)
        self.proj.residual_init = True
        self.dropout = shape.dropout
        self.resid_drop = nn.Dropout(shape.dropout)
        self.recompute_attention = recompute_attention  # selective recompute of the attention core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, nh*3*hd)
        B, T = qkv.shape[:2]
        q, k, v = qkv.view(B, T, self.n_head, 3, self.head_dim).unbind(dim=3)  # each (B, T, nh, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = self._core(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.resid_drop(self.proj(y))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if self.recompute_attention and self.training and torch.is_grad_enabled():
            # Only q, k, v are kept; the (B, nh, T, T) scores, probabilities and dropout mask -- the
            # 5as/h term of the activations -- are recomputed in backward.
            return checkpoint(_attention, q, k, v, dropout_p, use_reentrant=False)
        return _attention(q, k, v, dropout_p)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    # Flash / memory-efficient kernels on GPU, the math kernel on CPU.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, shape: ModelShape, layers: LayerProvider):
        super().__init__()
        self.fc1 = layers.column(shape.n_embd, 4 * shape.n_embd)
        self.fc2 = layers.row(4 * shape.n_embd, shape.n_embd)
        self.fc2.residual_init = True
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layers: LayerProvider, recompute_attention: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd)
        self.attn = CausalSelfAttention(shape, layers, recompute_attention)
        self.ln_2 = nn.LayerNorm(shape.n_embd)
        self.mlp = MLP(shape, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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
        self.layers = layers or DenseLayers()
        self.wte = self.layers.embedding(shape.vocab_size, shape.n_embd)
        self.wpe = nn.Embedding(shape.seq_len, shape.n_embd)
        self.drop = nn.Dropout(shape.dropout)
        selective = recompute == "selective"
        self.blocks = nn.ModuleList(Block(shape, self.layers, selective) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd)
        if seed is not None and self.wte.weight.device.type != "meta":
            self.init_weights(seed)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> mean loss against targets (B, T), or logits if targets is None."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, h)
        x = self._run_blocks(self.layers.to_block_layout(x))
        x = self.layers.from_block_layout(self.ln_f(x))
        logits = self.layers.lm_logits(x, self.wte)  # (B, T, V) or its vocab shard
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
    projections ~ N(0, 0.02/sqrt(2·n_layer)), biases 0, LayerNorm (1, 0).

    ``whole(param)``, if given, is a context in which a partitioned parameter is whole and writable
    (ZeRO-3's ``GatheredParameters``): parameters are then drawn one at a time.
    """
    for mod_name, sub, name, param in _leaf_params(module):
        qualified = ".".join(part for part in (prefix, mod_name, name) if part)
        with whole(param) if whole is not None else nullcontext():
            _init_param(sub, name, param, qualified, seed, n_layer)


def _init_param(sub: nn.Module, name: str, param: nn.Parameter, qualified: str, seed: int, n_layer: int) -> None:
    if isinstance(sub, nn.LayerNorm):
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
