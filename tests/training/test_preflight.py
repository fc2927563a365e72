"""The memory preflight: the planner's lower bound for the launched layout against a rank's memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import compose_config
from trainer.config.schema import BadInput
from trainer.training import preflight

CPU = torch.device("cpu")


def _cfg(*overrides: str):
    return compose_config(["model=gpt-tiny", *overrides])[0]


def _with_available(monkeypatch, nbytes: float, local_ranks: int = 1) -> None:
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=nbytes))
    monkeypatch.setenv("LOCAL_SIZE", str(local_ranks))


def test_a_layout_that_fits_passes(monkeypatch):
    cfg = _cfg()
    needed = preflight.predicted_bytes(cfg, preflight.launched_layout(cfg, 1))
    _with_available(monkeypatch, needed * 1.01)
    preflight.check_memory(cfg, 1, CPU)


def test_refusal_names_needed_and_available_and_the_cheapest_fix(monkeypatch):
    cfg = _cfg("parallel.micro_batch=4", "parallel.global_batch=8")
    layout = preflight.launched_layout(cfg, 1)
    needed = preflight.predicted_bytes(cfg, layout)
    smaller = preflight.predicted_bytes(cfg, preflight.replace(layout, micro_batch=2))
    _with_available(monkeypatch, 4 * (needed + smaller) / 2, local_ranks=4)  # a quarter each: between the two
    with pytest.raises(BadInput) as err:
        preflight.check_memory(cfg, 1, CPU)
    message = str(err.value)
    assert f"needs at least {needed / 1e9:.1f} GB per rank" in message and "/ 4 local ranks" in message
    assert f"parallel.micro_batch=2 needs at least {smaller / 1e9:.1f} GB" in message
    assert message.endswith("or set train.memory_check=false to start anyway") and "\n" not in message


def test_without_a_fitting_change_it_asks_for_more_ranks(monkeypatch):
    _with_available(monkeypatch, 1e6)
    with pytest.raises(BadInput, match="use more ranks"):
        preflight.check_memory(_cfg(), 1, CPU)


def test_the_fixes_come_cheapest_first():
    cfg = _cfg("parallel.micro_batch=4", "parallel.global_batch=8")
    changes = [change for change, _ in preflight._candidates(preflight.launched_layout(cfg, 2), 8)]
    assert changes == [
        "parallel.micro_batch=2",
        "parallel.micro_batch=1",
        "parallel.recompute=full",
        "parallel.zero_stage=1",
        "parallel.zero_stage=2",
        "parallel.zero_stage=3",
        "parallel.micro_batch=1 parallel.recompute=full parallel.zero_stage=3",
    ]


def test_the_check_can_be_turned_off(monkeypatch):
    _with_available(monkeypatch, 1e6)
    preflight.check_memory(_cfg("train.memory_check=false"), 1, CPU)


def test_the_bound_counts_no_attention_scores():
    """Fused attention keeps no s×s scores: a longer context grows the bound linearly, not quadratically
    (the scores' share would be 5as/h = 80 of ~114 units per token at s = 4096)."""
    short, long = (_cfg(f"model.seq_len={s}") for s in (1024, 4096))
    grow = [preflight.predicted_bytes(c, preflight.launched_layout(c, 1)) for c in (short, long)]
    assert grow[1] < 4.5 * grow[0]


def test_the_fused_loss_lowers_the_bound_by_the_logits_less_its_gradients(monkeypatch):
    """speed.fused_loss keeps no (tokens, V) fp32 logits but the gradients of the head's input and weight: a run
    that is refused with the whole logits starts with the fused head."""
    big_vocab = ["model.vocab_size=65536", "parallel.micro_batch=4", "parallel.global_batch=8"]
    unfused, fused = _cfg(*big_vocab), _cfg(*big_vocab, "speed.fused_loss=true")
    needed = [preflight.predicted_bytes(c, preflight.launched_layout(c, 1)) for c in (unfused, fused)]
    s, b, h, V = 256, 4, 256, 65536
    assert needed[0] - needed[1] == pytest.approx(4 * s * b * V - 4 * (s * b * h + V * h))
    _with_available(monkeypatch, sum(needed) / 2)
    with pytest.raises(BadInput):
        preflight.check_memory(unfused, 1, CPU)
    preflight.check_memory(fused, 1, CPU)
