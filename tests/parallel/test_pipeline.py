"""Pipeline parallelism: a DeepSpeed ``PipelineEngine`` over the GPT pipeline trains exactly as the
dense single-process GPT does, at pp=2, pp=2 x tp=2 (with and without sequence parallelism),
pp=2 x dp=2 and pp=4.

Every run checks, on every rank:
* init: each stage's parameters are the dense GPT's (or their tp shards) for the same seed, and the
  stages together hold every dense parameter;
* training: 3 optimizer steps of m=4 micro-batches each (AdamW, weight decay, clipping at 1.0, which
  is active: the norms are 1.3-2.0) give the dense losses and pre-clipping gradient norms within 1e-5
  relative, and the dense weights afterwards (the whole update to 1e-3 relative);
* evaluation: ``eval_batch`` gives the dense loss;
* the tied embedding: the first stage's token embedding equals the last stage's head weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.model import GPT, DenseLayers, ModelShape
from trainer.model.gpt import Block
from trainer.parallel.pipeline import dense_param_name, dense_prefix

from .spawn import run_ranks, start_deepspeed

SHAPE = ModelShape(n_layer=4, n_embd=64, n_head=4, seq_len=16, vocab_size=128)
SEED = 3
MICRO, ACCUM, STEPS = 2, 4, 3
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.1, 1.0


def ds_config(dims, zero: int, sequence_parallel: bool) -> dict:
    from trainer.parallel.pipeline import pipeline_config

    return {
        "train_batch_size": MICRO * ACCUM * dims.dp,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
        "zero_optimization": {"stage": zero},
        "pipeline": pipeline_config(dims, sequence_parallel),
    }


def global_batches(dp: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """STEPS global batches of ACCUM * dp micro-batches (inputs, targets), int64 (MICRO, T)."""
    tokens = torch.randint(
        0, SHAPE.vocab_size, (STEPS, ACCUM * dp, MICRO, SHAPE.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    return [[(t[:, :-1], t[:, 1:]) for t in step] for step in tokens]


def dense_reference(dp: int) -> tuple[GPT, list[float], list[float]]:
    """The dense GPT trained on the same global batches: losses and pre-clipping gradient norms."""
    from trainer.runtime.engine import param_groups

    model = GPT(SHAPE, DenseLayers(), SEED)
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)
    losses, norms = [], []
    for batch in global_batches(dp):
        opt.zero_grad()
        total = 0.0
        for x, y in batch:
            loss = model(x, y)
            (loss / len(batch)).backward()  # DeepSpeed averages micro-batches (and dp ranks)
            total += loss.item() / len(batch)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        losses.append(total)
    return model, losses, norms


def dense_shards(module, dense: GPT, mesh) -> dict[str, torch.Tensor]:
    """The dense parameter (or this rank's tp shard of it) for each of this stage's parameters."""
    from trainer.parallel.mappings import split

    full = dict(dense.named_parameters())
    shards = {}
    for name, param in module.named_parameters():
        expected = full[dense_param_name(name, SHAPE.n_layer)].detach()
        if getattr(param, "tensor_model_parallel", False):
            expected = split(expected, param.partition_dim, mesh.tp_group)
        shards[name] = expected
    return shards


def _check_training(rank: int, world: int, tp: int, pp: int, zero: int, sp: bool, partition: str, ckpt: int) -> None:
    deepspeed = start_deepspeed(rank, world)
    from trainer.parallel import (
        CommStats,
        ParallelDims,
        TensorParallelLayers,
        build_mesh,
        register_sequence_parallel_grad_hooks,
    )
    from trainer.parallel.pipeline import build_pipeline_module, install_pipeline_clipping
    from trainer.runtime.engine import param_groups

    dims = ParallelDims(world, tp=tp, pp=pp)
    mesh = build_mesh(dims)
    stats = CommStats()
    layers = DenseLayers() if tp == 1 else TensorParallelLayers(mesh.tp_group, stats, sequence_parallel=sp)
    module = build_pipeline_module(SHAPE, layers, dims, SEED, partition, activation_checkpoint_interval=ckpt)
    if sp:
        register_sequence_parallel_grad_hooks(module, mesh.tp_group, stats)

    # Init: the dense GPT's weights, bitwise, and every one of them somewhere in the pipeline.
    initial = dense_shards(module, GPT(SHAPE, DenseLayers(), SEED), mesh)
    for name, param in module.named_parameters():
        assert torch.equal(param.detach(), initial[name]), f"{name} differs from the dense init"
    held: list[set[str] | None] = [None] * world
    dist.all_gather_object(held, {dense_param_name(n, SHAPE.n_layer) for n, _ in module.named_parameters()})
    assert set().union(*held) == {n for n, _ in GPT(SHAPE, DenseLayers(), SEED).named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, WEIGHT_DECAY), config=ds_config(dims, zero, sp)
    )
    assert install_pipeline_clipping(engine) == (zero == 0)
    if ckpt:  # the runs of Blocks are recomputed in backward; nothing else is
        holds_block = any(isinstance(child, Block) for child in module.children())
        assert any(module.is_checkpointable_results) == holds_block

    dense, ref_losses, ref_norms = dense_reference(dims.dp)
    for step, batch in enumerate(global_batches(dims.dp)):
        mine = batch[mesh.coords.dp * ACCUM : (mesh.coords.dp + 1) * ACCUM]
        loss = engine.train_batch(iter(mine))  # every stage gets the dp-mean loss
        norm = engine.get_global_grad_norm()
        assert norm is not None, "no gradient norm reported"
        torch.testing.assert_close(loss.item(), ref_losses[step], rtol=1e-5, atol=0, msg=f"loss, step {step}")
        torch.testing.assert_close(float(norm), ref_norms[step], rtol=1e-5, atol=0, msg=f"grad norm, step {step}")
    # The weights after the last step (which no loss above sees). Compared as the whole update,
    # ||w - w_dense|| <= 1e-3·||w_dense - w_init||: Adam's step lr·m/(√v + ε) is ~lr in size even for a
    # gradient at rounding-noise level, so single elements (qkv biases here) may differ by ~lr/10.
    trained = dense_shards(module, dense, mesh)
    for name, param in module.named_parameters():
        update = (trained[name] - initial[name]).norm()
        error = (param.detach() - trained[name]).norm()
        assert error <= 1e-3 * update + 1e-7, f"{name}: |w - w_dense| = {error:.3g}, |update| = {update:.3g}"

    # Evaluation: eval_batch gives every rank the dense model's mean loss over the dp ranks' batches.
    val = global_batches(dims.dp)[0]
    with torch.no_grad():
        ref_eval = sum(dense(x, y).item() for x, y in val) / len(val)
    mine = val[mesh.coords.dp * ACCUM : (mesh.coords.dp + 1) * ACCUM]
    eval_loss = engine.eval_batch(iter(mine), num_micro_batches=len(mine))
    torch.testing.assert_close(eval_loss.item(), ref_eval, rtol=1e-5, atol=0, msg="eval loss")

    # The tied embedding: after the steps, the first stage's copy equals the last stage's, bitwise.
    coords = mesh.coords
    wte = module.tied_modules.embed.wte.weight.detach() if "embed" in module.tied_modules else None
    copies: list[tuple | None] = [None] * world
    dist.all_gather_object(copies, (coords.pp, coords.dp, coords.tp, wte))
    for stage, dp, tp_rank, weight in copies:
        if stage == pp - 1:
            first = next(w for s, d, t, w in copies if (s, d, t) == (0, dp, tp_rank))
            assert weight is not None and torch.equal(weight, first), f"tied copies differ at dp={dp} tp={tp_rank}"


CASES = {
    # name: (world, tp, pp, zero, sequence_parallel, partition_method, activation_checkpoint_interval)
    "pp2-zero0": (2, 1, 2, 0, False, "parameters", 0),
    "pp2-tp2-zero1-partitioned": (4, 2, 2, 1, False, "parameters", 0),
    "pp2-tp2-sp-zero0-uniform": (4, 2, 2, 0, True, "uniform", 0),
    "pp2-dp2-zero0": (4, 1, 2, 0, False, "parameters", 0),
    "pp4-zero1-ckpt": (4, 1, 4, 1, False, "parameters", 1),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_trains_as_dense(case):
    world, *args = CASES[case]
    run_ranks(_check_training, world, *args)


def test_dense_param_names():
    l = SHAPE.n_layer
    assert dense_param_name("tied_modules.embed.wte.weight", l) == "wte.weight"
    assert dense_param_name("tied_modules.embed.wpe.weight", l) == "wpe.weight"
    assert dense_param_name("1.attn.qkv.weight", l) == "blocks.0.attn.qkv.weight"
    assert dense_param_name(f"{l}.mlp.fc2.bias", l) == f"blocks.{l - 1}.mlp.fc2.bias"
    assert dense_param_name(f"{l + 1}.ln_f.weight", l) == "ln_f.weight"
    assert dense_prefix(0, l) == "" and dense_prefix(l + 2, l) == ""
    for bad in ("wte.weight", f"{l + 3}.x.weight", "1"):
        with pytest.raises(ValueError):
            dense_param_name(bad, l)


def test_build_rejects_bad_arguments():
    from trainer.parallel import ParallelDims
    from trainer.parallel.pipeline import build_pipeline_module

    dims = ParallelDims(2, pp=2)
    with pytest.raises(ValueError, match="partition_method"):
        build_pipeline_module(SHAPE, DenseLayers(), dims, SEED, partition_method="type:Block")
    with pytest.raises(ValueError, match="activation_checkpoint_interval"):
        build_pipeline_module(SHAPE, DenseLayers(), dims, SEED, activation_checkpoint_interval=-1)
    with pytest.raises(ValueError, match="tp"):
        build_pipeline_module(SHAPE, DenseLayers(), ParallelDims(4, tp=2, pp=2), SEED)
