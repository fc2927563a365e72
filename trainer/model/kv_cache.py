"""Keys and values of the tokens seen so far, for decoding one token at a time without recomputing the
prefix (single process, the dense model)."""

from __future__ import annotations

import torch


class KVCache:
    """Per block, the keys and values of the first ``length`` positions: (B, n_kv_head, capacity, head_dim).

    The model reads ``length`` as the position of the tokens it is given, writes their keys and values with
    ``update`` in every block, then moves ``length`` on (``GPT.forward(..., cache=...)`` does both).
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, capacity: int, head_dim: int, dtype, device):
        shape = (n_layer, batch, n_kv_head, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    @classmethod
    def for_model(cls, shape, batch: int, dtype=torch.float32, device="cpu", capacity: int | None = None) -> KVCache:
        """A cache for a dense model of ``shape`` (a ``ModelShape``), ``capacity`` positions (default its context)."""
        capacity = shape.seq_len if capacity is None else capacity
        return cls(shape.n_layer, batch, shape.kv_heads, capacity, shape.head_dim, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' (B, nkv, T, hd) keys and values of block ``layer``; every position's so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} asked for")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
