"""The layer provider: how the model obtains the layers that tensor parallelism may split.

The GPT in ``gpt.py`` is single-device code. It asks a provider for its embedding and its linear
layers, and for the two operations that see the whole vocabulary (tied output head and loss).
``DenseLayers`` hands out plain ``torch.nn`` modules, so the tp=1 model *is* the dense reference of
every parity test; the tensor-parallel provider hands out shard-sized layers with the same
interface and the same full (gathered) weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LayerProvider(Protocol):
    tp_size: int  # ranks that share each layer; attention heads are split by it

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding; may split its rows (the vocabulary) across ranks."""

    def column(self, in_features: int, out_features: int) -> nn.Module:
        """Y = XA + b with A split along its output features (attention QKV, MLP fc1)."""

    def row(self, in_features: int, out_features: int) -> nn.Module:
        """Y = XA + b with A split along its input features, outputs summed (attention proj, MLP fc2)."""

    def to_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h) embeddings -> the activation layout between blocks (sequence-split under SP)."""

    def from_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_block_layout``, before the output head."""

    def lm_logits(self, x: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """Logits of the output head tied to ``embedding`` (possibly vocab-split)."""

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token loss over logits as returned by ``lm_logits``."""


class DenseLayers:
    """Single-device layers: plain ``nn.Embedding`` / ``nn.Linear`` and ``F.cross_entropy``."""

    tp_size = 1

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def column(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features)

    def to_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_block_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def lm_logits(self, x: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        return F.linear(x, embedding.weight)  # (B, T, V)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
