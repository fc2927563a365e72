"""Autoregressive decoding of a dense GPT: greedy or sampled (temperature, top-k, top-p), with a key/value
cache or without one (every step re-reads the whole sequence: the reference the cache is checked against)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.model import GPT
from trainer.model.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 200  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (nucleus); 1 = all
    seed: int = 0

    def problem(self) -> tuple[str, object, str] | None:
        """(key, value, fix) of the first invalid setting, or None."""
        checks = [
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature, self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
        ]
        return next(((key, value, fix) for key, value, ok, fix in checks if not ok), None)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from the last position's logits (V,)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the tokens ahead
        logits = logits.scatter(0, order, ordered.masked_fill(before >= sampling.top_p, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    sampling: Sampling,
    eos_id: int | None = None,
    cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The new tokens after ``prompt`` (stopping after ``eos_id``, if given), each passed to ``on_token`` as
    it comes. The prompt plus the new tokens must fit the model's context (``model.shape.seq_len``)."""
    shape, device = model.shape, model.wte.weight.device
    if not prompt or len(prompt) + sampling.max_new_tokens > shape.seq_len:
        room = f"{sampling.max_new_tokens} new ones vs context {shape.seq_len}"
        raise ValueError(f"prompt of {len(prompt)} tokens + {room}")
    generator = torch.Generator().manual_seed(sampling.seed)
    kv = KVCache.for_model(shape, 1, model.wte.weight.dtype, device, len(prompt) + sampling.max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache=kv if cache else None)[0, -1]
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        token = next_token(logits, sampling, generator)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id or len(new) == sampling.max_new_tokens:
            break
        if cache:
            logits = model(torch.tensor([[token]], device=device), cache=kv)[0, -1]
        else:
            logits = model(torch.tensor([prompt + new], device=device))[0, -1]
    return new
