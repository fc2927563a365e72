"""The layer provider: how the model obtains the layers that tensor parallelism may split.

The GPT in ``gpt.py`` is single-device code. It asks a provider for its embedding, its linear layers and
an untied output head, and for the two operations that see the whole vocabulary (output head and loss).
``DenseLayers`` hands out plain ``torch.nn`` modules, so the tp=1 model *is* the dense reference of
every parity test; the tensor-parallel provider hands out shard-sized layers with the same
interface and the same full (gathered) weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# The norms the models use: initialised to (1, 0); under sequence parallelism each rank's gradient of their
# parameters covers its sequence chunk only.
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


class LayerProvider(Protocol):
    tp_size: int  # ranks that share each layer; attention heads are split by it

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding; may split its rows (the vocabulary) across ranks."""

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """Y = XA (+ b) with A split along its output features (attention QKV, MLP fc1)."""

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """Y = XA (+ b) with A split along its input features, outputs summed (attention proj, MLP fc2)."""

    def head(self, vocab_size: int, dim: int) -> nn.Module:
        """An untied output head: a (V, h) ``weight`` that ``lm_logits`` uses, split like the embedding."""

    def to_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h) embeddings -> the activation layout between blocks (sequence-split under SP)."""

    def from_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_block_layout``, before the output head."""

    def lm_logits(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """Logits x·Wᵀ of the output head ``head`` -- the token embedding when tied (possibly vocab-split)."""

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token loss over logits as returned by ``lm_logits``."""

    def fused_head_loss(self, x: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        """``cross_entropy(lm_logits(x, head), targets)`` chunk by chunk, never holding the whole logits
        (``trainer.model.fused_loss``)."""


def mark_padding(head: nn.Module, real_vocab: int) -> None:
    """Tell an output head (the tied embedding or ``lm_head``) where its padding rows start (0: none)."""
    head.real_vocab = real_vocab


def mask_padding(logits: torch.Tensor, head: nn.Module, start: int = 0) -> torch.Tensor:
    """Logits of the vocabulary's padding rows set to -inf in place (``logits`` hold vocabulary entries
    start.. of the head ``mark_padding`` marked): padding is in no softmax, loss or argmax, so a padded model
    computes what its unpadded Hugging Face export computes, at any tp. Their gradient is zero."""
    real = getattr(head, "real_vocab", 0)
    if real and start + logits.shape[-1] > real:
        logits[..., max(real - start, 0) :] = float("-inf")
    return logits


class DenseLayers:
    """Single-device layers: plain ``nn.Embedding`` / ``nn.Linear`` and ``F.cross_entropy``."""

    tp_size = 1

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def head(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Linear(dim, vocab_size, bias=False)

    def to_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def lm_logits(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        return mask_padding(F.linear(x, head.weight), head)  # (B, T, V)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def fused_head_loss(self, x: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        from trainer.model.fused_loss import chunked_head_cross_entropy

        return chunked_head_cross_entropy(x, head, targets)
