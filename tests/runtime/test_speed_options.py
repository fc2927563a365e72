"""The speed options (``speed.*``) on CPU: what each puts into the DeepSpeed config, what is refused before start,
and that each one on gives the losses it gives off (fp32, within the parity tolerance). The GPU side of the
same options is tests/runtime/test_gpu.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import LAYOUTS, PARITY_RTOL, compose_config, read_metrics, run_train, tiny_corpus_overrides
from trainer.config.schema import ConfigError
from trainer.config.validate import validate
from trainer.model import GPT, ModelShape
from trainer.runtime.ds_config import OWNED, ds_config, extra_problem, merge_extra
from trainer.runtime.speed import compile_blocks, use_flash

# --- the DeepSpeed config -----------------------------------------------------------------------------------


def _ds(overrides: list[str], cuda: bool, world: int = 2) -> dict:
    cfg, _ = compose_config(["debug=smoke", *overrides])
    return ds_config(cfg, validate(cfg, world_size=world), cuda=cuda)


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_auto_speed_keys_are_on_for_cuda_and_off_on_cpu(cuda):
    ds = _ds(["parallel.zero_stage=2"], cuda)
    assert ds["optimizer"]["params"]["fused"] is cuda and ds["optimizer"]["params"]["torch_adam"]
    assert ds["zero_optimization"]["overlap_comm"] is cuda
    assert ds["zero_optimization"]["contiguous_gradients"] is True


def test_speed_keys_given_on_the_command_line_win_over_auto():
    # Hydra hands true/false to these str keys as "True"/"False"
    ds = _ds(["parallel.zero_stage=1", "speed.fused_adamw=true", "speed.overlap_comm=true"], cuda=False)
    assert ds["optimizer"]["params"]["fused"] and ds["zero_optimization"]["overlap_comm"]
    ds = _ds(["parallel.zero_stage=1", "speed.overlap_comm=false", "speed.contiguous_gradients=false"], cuda=True)
    assert not ds["zero_optimization"]["overlap_comm"] and not ds["zero_optimization"]["contiguous_gradients"]


@pytest.mark.parametrize(
    "overrides, world, cuda, stage",
    [
        (["parallel.precision=bf16"], 1, True, 0),  # off by default, on CUDA too
        (["parallel.precision=bf16", "speed.flat_optimizer=auto"], 1, True, 1),  # auto on CUDA: ZeRO-1, one rank
        (["parallel.precision=fp16", "speed.flat_optimizer=auto"], 1, True, 1),
        (["parallel.precision=bf16", "speed.flat_optimizer=auto"], 1, False, 0),  # auto on CPU: off
        (["parallel.precision=bf16", "speed.flat_optimizer=true"], 1, False, 1),
        (["parallel.precision=fp32", "speed.flat_optimizer=true"], 1, True, 0),  # no wrapper to replace
        (["parallel.precision=bf16", "speed.flat_optimizer=true"], 2, True, 0),  # dp 2: ZeRO-1 would partition
        (["parallel.precision=bf16", "parallel=tp2", "speed.flat_optimizer=true"], 2, True, 1),  # tp 2 x dp 1
        (["parallel.precision=bf16", "parallel=pp2", "speed.flat_optimizer=true"], 2, True, 0),  # BF16_Optimizer
        (["parallel.precision=bf16", "parallel.zero_stage=2", "speed.flat_optimizer=true"], 1, True, 2),
    ],
)
def test_flat_optimizer_replaces_zero0_only_at_one_data_parallel_rank(overrides, world, cuda, stage):
    assert _ds(overrides, cuda, world)["zero_optimization"]["stage"] == stage


def test_deepspeed_extra_is_deep_merged():
    ds = _ds(["parallel.zero_stage=2", "+speed.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu"], False)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["stage"] == 2 and "reduce_bucket_size" in zero
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert merge_extra(base, {"a": {"c": {"f": 4}}, "e": 5}) == {"a": {"b": 1, "c": {"d": 2, "f": 4}}, "e": 5}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}  # unchanged


@pytest.mark.parametrize(
    "override, message",
    [
        ("+speed.deepspeed_extra.zero_optimization.stage=3", "use parallel.zero_stage instead"),
        ("+speed.deepspeed_extra.train_micro_batch_size_per_gpu=8", "use parallel.micro_batch instead"),
        ("+speed.deepspeed_extra.optimizer.params.lr=1", "use optim.* (lr, betas"),
        ("+speed.deepspeed_extra.bf16.enabled=true", "use parallel.precision instead"),
        ("+speed.deepspeed_extra.gradient_clipping=2", "use optim.grad_clip instead"),
        ("+speed.deepspeed_extra.zero_optimization.overlap_comm=true", "use speed.overlap_comm instead"),
        ("+speed.deepspeed_extra.zero_optimisation.stage=1", "did you mean zero_optimization?"),
        ("+speed.deepspeed_extra.flops_profile.enabled=true", "did you mean flops_profiler?"),
        ("speed.fused_adamw=sometimes", "must be one of auto, true, false"),
        ("speed.flat_optimizer=maybe", "must be one of auto, true, false"),
        ("speed.flash_attention=true", "flash needs a CUDA device and bf16/fp16"),
        ("speed.compile=true parallel.zero_stage=3", "tp=1, pp=1 and ZeRO <= 2"),
    ],
)
def test_bad_speed_settings_are_refused_in_one_line(override, message):
    cfg, _ = compose_config(["debug=smoke", *override.split()])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    assert message in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("speed.")


def test_deepspeeds_own_keys_pass():
    extra = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}, "round_robin_gradients": True},
        "flops_profiler": {"enabled": True},
        "communication_data_type": "fp32",
        "zero_force_ds_cpu_optimizer": False,
        "wandb": {"enabled": False},
    }
    assert extra_problem(extra) is None
    assert set(OWNED) >= {"train_batch_size", "optimizer", "bf16", "fp16", "zero_optimization.stage"}


def test_the_command_line_accepts_deepspeed_keys_it_does_not_list():
    from trainer.config.cli import compose, register

    register()
    cfg = compose(["debug=smoke", "+speed.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu"])
    assert cfg.speed.deepspeed_extra == {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}


# --- the model-side options ---------------------------------------------------------------------------------


def _losses(model: GPT, steps: int = 4) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, model.shape.vocab_size, (4, 33), generator=gen)
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_attention_pinned_to_the_flash_kernel_gives_the_same_losses(recompute):
    """torch has a flash kernel on CPU too (fp32, no dropout): the pinned path runs here, losses as unpinned."""
    shape = ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256, n_kv_head=2)
    reference = _losses(GPT(shape, seed=1, recompute=recompute))
    model = GPT(shape, seed=1, recompute=recompute)
    assert use_flash(model) == 2
    assert all(math.isclose(a, b, rel_tol=PARITY_RTOL) for a, b in zip(_losses(model), reference))


def test_pinned_flash_fails_instead_of_falling_back():
    """Dropout has no CPU flash kernel: a pinned call raises rather than quietly running another kernel."""
    model = GPT(ModelShape(n_layer=1, n_embd=32, n_head=2, seq_len=16, vocab_size=64, dropout=0.1), seed=1)
    use_flash(model)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))


def test_compiled_blocks_run_the_pinned_kernel():
    """speed.compile with flash required (a GPU run with both): dynamo traces the sdpa_kernel context; same loss."""
    shape = ModelShape(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256)
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for compiled in (False, True):
        model = GPT(shape, seed=1)
        use_flash(model)
        if compiled:
            compile_blocks(model)
        losses.append(model(idx[:, :-1], idx[:, 1:]).item())
    assert math.isclose(*losses, rel_tol=PARITY_RTOL)


def test_compile_blocks_keeps_the_modules_and_their_parameters():
    model = GPT(ModelShape(n_layer=2, n_embd=32, n_head=2, seq_len=16, vocab_size=64), seed=1)
    names = [name for name, _ in model.named_parameters()]
    assert compile_blocks(model) == 2
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and DeepSpeed see the same


def test_padding_rows_are_in_no_softmax():
    """model.make_vocab_size_divisible_by=128 pads 300 rows to 384: the padded model's logits of the padding are
    -inf, its loss and gradients those of the unpadded model with the same rows, the padding's gradient zero."""
    from trainer.model.shape import padded_vocab

    shape = ModelShape(n_layer=2, n_embd=32, n_head=2, seq_len=16, vocab_size=300, vocab_multiple=128)
    padded, plain = GPT(shape.padded(), seed=1), GPT(shape, seed=1)
    assert padded.wte.weight.shape[0] == padded_vocab(300, 1, 128) == 384 and plain.wte.weight.shape[0] == 300
    with torch.no_grad():  # the padded model's first 300 rows are the plain model's
        plain.wte.weight.copy_(padded.wte.weight[:300])
    idx = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    assert torch.isneginf(padded(idx[:, :-1])[..., 300:]).all()
    losses = [model(idx[:, :-1], idx[:, 1:]) for model in (padded, plain)]
    for loss in losses:
        loss.backward()
    assert math.isclose(losses[0].item(), losses[1].item(), rel_tol=1e-6)
    assert torch.allclose(padded.wte.weight.grad[:300], plain.wte.weight.grad, atol=1e-7)
    assert torch.all(padded.wte.weight.grad[300:] == 0)
    assert shape.padded().unpadded_params() == shape.unpadded_params() == shape.params() - 84 * 32


# --- each option on vs off, through the trainer (fp32, one process) -----------------------------------------


def _train(run_dir: Path, data_cache: Path, *extra: str, ranks: int = 0, says: str = "") -> list[float]:
    overrides = ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=4", "train.save_interval=-1", *extra]
    proc = run_train(run_dir, overrides, ranks, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout, proc.stdout[-2000:]  # the start-up line on what the speed options resolved to
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, data_cache) -> list[float]:
    return _train(tmp_path_factory.mktemp("speed-off") / "run", data_cache, says="fused AdamW off, no ZeRO")


@pytest.mark.parametrize(
    "option, says",
    [
        ("speed.fused_adamw=true", "fused AdamW on"),  # torch's fused kernel, on CPU
        ("speed.compile=true", "compiled blocks 2"),  # inductor on CPU (needs a C compiler: the first steps compile)
        ("speed.fused_loss=true", "fused loss on"),  # the head and loss in chunks (trainer.model.fused_loss)
        (  # ZeRO-Offload: the optimizer states and step on the host
            "parallel.zero_stage=2 +speed.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu",
            "overlap_comm off",
        ),
    ],
    ids=["fused-adamw", "compile", "fused-loss", "zero-offload"],
)
def test_each_option_gives_the_same_losses(option, says, reference_losses, tmp_path, data_cache):
    losses = _train(tmp_path / "run", data_cache, *option.split(), says=says)
    assert len(losses) == len(reference_losses) == 4
    assert all(math.isclose(a, b, rel_tol=PARITY_RTOL) for a, b in zip(losses, reference_losses)), (
        losses,
        reference_losses,
    )


@pytest.mark.slow
def test_overlap_comm_gives_the_same_losses_on_two_ranks(tmp_path, data_cache):
    """DeepSpeed's overlap_comm runs on gloo too (auto leaves it off on CPU): ZeRO-2 at dp 2, on vs off."""
    off, on = (
        _train(tmp_path / f"overlap-{value}", data_cache, "parallel=zero2", f"speed.overlap_comm={value}", ranks=2)
        for value in ("false", "true")
    )
    assert all(math.isclose(a, b, rel_tol=PARITY_RTOL) for a, b in zip(on, off)), (on, off)


# (layout, model overrides): the head vocabulary-split, and the tied embedding's copy on the last pipeline stage;
# gathered by ZeRO-3; an untied Llama head on the last stage.
FUSED_LOSS_CASES = {
    "tp2-pp2": ("tp2-pp2", []),
    "zero3-dp2": ("zero3-dp2", []),
    "pp2-llama": ("pp2", ["model=llama-tiny"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FUSED_LOSS_CASES)
def test_fused_loss_at_other_layouts_gives_the_single_process_losses(case, reference_losses, tmp_path, data_cache):
    layout, model = FUSED_LOSS_CASES[case]
    ranks, extra = LAYOUTS[layout]
    reference = _train(tmp_path / "single", data_cache, *model, says="fused loss off") if model else reference_losses
    fused = [*extra, *model, "speed.fused_loss=true"]
    losses = _train(tmp_path / "run", data_cache, *fused, ranks=ranks, says="fused loss on")
    assert len(losses) == len(reference) == 4
    assert all(math.isclose(a, b, rel_tol=PARITY_RTOL) for a, b in zip(losses, reference)), (losses, reference)
