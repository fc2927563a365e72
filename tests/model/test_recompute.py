"""Activation recompute (``parallel.recompute``): the same numbers, fewer saved activations.

In-process, on the dense GPT with dropout: ``full`` (runs of 1 and 2 blocks) and ``selective`` give
the loss and every gradient of ``none`` -- torch's non-reentrant checkpoint restores the RNG state, so
the recomputed dropout masks are the forward's -- while autograd keeps fewer bytes for backward
(full < selective < none). Through the launcher: tp2 with full and pp2 with selective recompute train
step for step as the same layout without it, and ZeRO-3 with full recompute as ZeRO-3 without
(DeepSpeed 0.19.8's parameter coordinator re-gathers the parameters a recompute needs).
"""

from __future__ import annotations

import pytest
import torch

from conftest import PARITY_RTOL, compose_config, read_metrics, run_train, tiny_corpus_overrides
from trainer.config.schema import ConfigError
from trainer.config.validate import recompute_plan, validate
from trainer.model import GPT, ModelShape, gpt
from trainer.training.instruments import ActivationMeter

SHAPE = ModelShape(n_layer=4, n_embd=64, n_head=4, seq_len=32, vocab_size=128, dropout=0.1)
SEED, BATCH = 5, 4
MODES = [("full", 1), ("full", 2), ("selective", 1)]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _model(recompute: str = "none", every: int = 1) -> GPT:
    return GPT(SHAPE, seed=SEED, recompute=recompute, checkpoint_every=every).train()


def _loss_and_grads(model: GPT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same dropout masks for every model
    loss = model(*_batch())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("recompute,every", MODES, ids=[f"{m}-{k}" for m, k in MODES])
def test_recompute_gives_the_same_loss_and_gradients(recompute, every):
    ref_loss, ref_grads = _loss_and_grads(_model())
    loss, grads = _loss_and_grads(_model(recompute, every))
    # Tolerance 0 (bitwise): the recompute runs the same CPU kernels on the same inputs with the
    # same RNG state, and every gradient is accumulated in the same order.
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize(
    "recompute,blocks,cores", [("none", 4, 4), ("full", 8, 8), ("selective", 4, 8)], ids=["none", "full", "selective"]
)
def test_what_runs_again_in_backward(recompute, blocks, cores, monkeypatch):
    """Forward calls of the blocks and of the attention core over one training step: full reruns every
    block in backward, selective only the attention core; evaluation and no_grad never recompute."""
    calls = {"block": 0, "core": 0}
    attention = gpt._attention

    def counted(*args):
        calls["core"] += 1
        return attention(*args)

    monkeypatch.setattr(gpt, "_attention", counted)
    model = _model(recompute)
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__("block", calls["block"] + 1))
    _loss_and_grads(model)
    assert calls == {"block": blocks, "core": cores}
    model.eval()
    with torch.no_grad():
        model(*_batch())
    assert calls == {"block": blocks + 4, "core": cores + 4}


def _saved_bytes(recompute: str) -> int:
    """Peak bytes autograd keeps for backward during one training forward (parameters excluded)."""
    model = _model(recompute)
    meter = ActivationMeter(model)
    torch.manual_seed(0)
    with meter.track():
        loss = model(*_batch())
    peak = meter.peak
    loss.backward()
    return peak


def test_recompute_saves_activation_memory():
    saved = {mode: _saved_bytes(mode) for mode in ("none", "selective", "full")}
    print(f"\nsaved for backward (bytes): {saved}")
    assert saved["full"] < saved["selective"] < saved["none"]
    # Selective drops the attention core's (B, nh, T, T) tensors: at least the fp32 probabilities and
    # the dropped-out probabilities of every layer (Korthikanti et al.'s 5as/h term, in fp32).
    b, a, s, layers = BATCH, SHAPE.n_head, SHAPE.seq_len, SHAPE.n_layer
    assert saved["none"] - saved["selective"] >= layers * 2 * 4 * b * a * s * s
    # Full keeps one (B, T, h) block input per block where it kept all of the block's activations.
    assert saved["none"] - saved["full"] >= layers * 10 * 4 * b * s * SHAPE.n_embd


def test_config_maps_to_the_model():
    def plan(*overrides):
        cfg = compose_config(["debug=smoke", *overrides])[0]
        validate(cfg, world_size=1)
        return recompute_plan(cfg.parallel)

    assert plan() == ("none", 1)
    assert plan("parallel.recompute=full") == ("full", 1)
    assert plan("parallel.recompute=full", "parallel.activation_checkpoint_interval=2") == ("full", 2)
    assert plan("parallel.activation_checkpoint_interval=2") == ("full", 2)  # as before: an interval is full
    assert plan("parallel.recompute=selective") == ("selective", 1)
    with pytest.raises(ConfigError, match="parallel.recompute"):
        plan("parallel.recompute=selective", "parallel.activation_checkpoint_interval=1")
    with pytest.raises(ValueError, match="recompute"):
        GPT(SHAPE, recompute="attention")


# --- through the launcher ------------------------------------------------------------------------

STEPS, LAYERS = 3, 4
# name -> (ranks, layout overrides, recompute override)
LAUNCHED = {
    "tp2-full": (2, ["parallel=tp2"], "parallel.recompute=full"),
    "pp2-selective": (2, ["parallel=pp2"], "parallel.recompute=selective"),
    "zero3-dp2-full": (2, ["parallel=zero3"], "parallel.recompute=full"),
}


def _launched_steps(run_dir, data_cache, ranks: int, *extra: str) -> list[dict]:
    overrides = [
        "debug=smoke",
        *tiny_corpus_overrides(data_cache),
        f"train.steps={STEPS}",
        "train.save_interval=-1",
        f"model.n_layer={LAYERS}",
        "model.dropout=0.1",  # recomputed dropout must repeat the forward's masks
        "parallel.micro_batch=2",
        "parallel.global_batch=8",
        *extra,
    ]
    proc = run_train(run_dir, overrides, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAUNCHED))
def test_launched_recompute_matches_the_same_layout(name, tmp_path, data_cache):
    ranks, layout, recompute = LAUNCHED[name]
    plain = _launched_steps(tmp_path / "plain", data_cache, ranks, *layout)
    steps = _launched_steps(tmp_path / "recompute", data_cache, ranks, *layout, recompute)
    # Per-step losses and gradient norms (the gradients of every step, the last one included).
    losses, reference = [(r["loss"], r["grad_norm"]) for r in steps], [(r["loss"], r["grad_norm"]) for r in plain]
    assert len(losses) == len(reference) == STEPS
    deviation = max(abs(a - b) / abs(b) for mine, ref in zip(losses, reference) for a, b in zip(mine, ref))
    saved = [[rank["mem"]["activations"] for rank in r["ranks"]] for r in (plain[0], steps[0])]
    print(f"\n{name}: losses {losses}, max relative deviation {deviation:.2e}, saved bytes per rank {saved}")
    assert deviation < PARITY_RTOL, (losses, reference)
    assert all(mine < theirs for mine, theirs in zip(*reversed(saved)))  # and it did recompute, on every rank
    if name == "tp2-full":  # the recomputed forward all-reduces again: 2 per block and micro-batch
        extra = steps[0]["tp_comm"]["all_reduce"]["count"] - plain[0]["tp_comm"]["all_reduce"]["count"]
        assert extra == 2 * LAYERS * 4  # 4 micro-batches of 2 make the global batch of 8
