"""Pipeline parallelism: the GPT of ``trainer.model.gpt`` as a DeepSpeed ``PipelineModule``.

The GPT is written as a flat sequence of layers, each of which maps one tensor to the next, so that
DeepSpeed can cut it into ``pp`` stages and run the 1F1B schedule (``TrainSchedule``) over them:

    position  spec                                         maps                          GPT names
    0         TiedLayerSpec("embed", GPTEmbedding)         ids (B, T) int64 -> x         wte.*, wpe.*
    1 .. l    LayerSpec(Block)                             x -> x                        blocks.{i-1}.*
    l+1       LayerSpec(FinalNorm)                         x -> ln_f(x), (B, T, h)       ln_f.*
    l+2       TiedLayerSpec("embed", forward_fn=lm_head)   (B, T, h) -> logits           (wte.weight, tied)

An untied model (``shape.tie_embeddings`` false, e.g. Llama) has plain ``LayerSpec``s at both ends: the
embedding at 0 and ``OutputHead`` (lm_head.*) at l+2, and no tied-weight traffic.
    loss      layers.cross_entropy(logits, targets)        -> mean token loss

``x`` is the activation between blocks, (B, T, h), or (B, T/tp, h) under sequence parallelism. The
logits are (B, T, V), or this tp rank's vocabulary shard (B, T, V/tp) under tensor parallelism, and the
loss is then the vocab-parallel cross-entropy. Only floating-point tensors cross stage boundaries, so
every received activation can require grad; the int64 token ids enter at the first stage only and the
int64 targets at the last (DeepSpeed's ``LoadMicroBatch`` hands batch[0] to the first, batch[1] to the
last stage).

The output head reuses the token embedding E (V, h): logits = x Eᵀ. When the first and last layer
live on different stages, both stages hold a copy of E; DeepSpeed all-reduces dL/dE over the two
copies before the optimizer step (``ReduceTiedGrads``) so they stay equal, and marks the last stage's
copy ``ds_pipe_replicated`` so that ZeRO's gradient norm counts it once. The last stage's copy of the
tied module has no position embedding (it is built from the head's spec; the first spec to reach a
stage builds the module, so at pp=1 the one module has both).

Initialisation is independent of the layout: after DeepSpeed has built this stage's layers, every
parameter is drawn by ``init_weights`` under its name in the dense GPT (``dense_param_name``), so the
gathered weights equal ``GPT(shape, DenseLayers(), seed)``'s at any tp and pp.

The engine: ``deepspeed.initialize(model=<this module>, mpu=None, ...)`` returns a ``PipelineEngine``;
DeepSpeed builds its own process grid from ``dims.deepspeed_topology()``, with the same rank layout as
``trainer.parallel.dims.Mesh``. Call ``install_pipeline_clipping(engine)`` after it (see there).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from trainer.model.gpt import Block, ModelShape, embed, init_weights, make_norm
from trainer.model.layers import LayerProvider, mark_padding
from trainer.model.shape import PIPELINE_PARTITIONS
from trainer.parallel.dims import ParallelDims
from trainer.parallel.grad_norm import local_grad_squares
from trainer.runtime.compat import check_tied_weight_sync, replace_fp32_clipping

TIED_KEY = "embed"
TIED_PREFIX = f"tied_modules.{TIED_KEY}."  # PipelineModule registers tied modules under this path


class GPTEmbedding(nn.Module):
    """x = dropout(E[ids] (+ P[0:T])), moved to the block layout; E is the token embedding (tied to the
    head or not), P the learned positions (models with rotary positions have none).

    ids (B, T) int64 -> (B, T, h), or (B, T/tp, h) under sequence parallelism. Attribute names match
    the dense GPT (``wte``, ``wpe``) so ``init_weights`` draws the same weights. ``position=False``
    builds the tied head's copy: only E, which is all the head needs.
    """

    def __init__(self, shape: ModelShape, layers: LayerProvider, position: bool = True):
        super().__init__()
        self.layers = layers  # a plain object, not a module: holds the tp group, not parameters
        self.fused_loss = False  # as the head: pass x on to the loss, which applies wte (fuse_head_loss)
        self.wte = layers.embedding(shape.vocab_size, shape.n_embd)
        mark_padding(self.wte, shape.real_vocab)
        if position and shape.position == "learned":
            self.wpe = nn.Embedding(shape.seq_len, shape.n_embd)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(embed(self.wte, getattr(self, "wpe", None), ids))  # (B, T, h)
        return self.layers.to_block_layout(x)


def lm_head(embedding: GPTEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied output head (``TiedLayerSpec`` forward_fn): (B, T, h) -> logits (B, T, V or V/tp), or x itself
    where the loss applies the head (``fuse_head_loss``)."""
    return x if embedding.fused_loss else embedding.layers.lm_logits(x, embedding.wte)


class OutputHead(nn.Module):
    """An untied output head, named as in the GPT (``lm_head.weight``): (B, T, h) -> logits."""

    def __init__(self, shape: ModelShape, layers: LayerProvider):
        super().__init__()
        self.layers = layers
        self.fused_loss = False  # pass x on to the loss, which applies lm_head (fuse_head_loss)
        self.lm_head = layers.head(shape.vocab_size, shape.n_embd)
        mark_padding(self.lm_head, shape.real_vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fused_loss else self.layers.lm_logits(x, self.lm_head)


class FinalNorm(nn.Module):
    """The final norm, then back from the block layout: (B, T or T/tp, h) -> (B, T, h)."""

    def __init__(self, shape: ModelShape, layers: LayerProvider):
        super().__init__()
        self.layers = layers
        self.ln_f = make_norm(shape)  # named as in the GPT: "ln_f.weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers.from_block_layout(self.ln_f(x))


def layer_specs(shape: ModelShape, layers: LayerProvider, recompute_attention: bool = False) -> list[LayerSpec]:
    """The n_layer + 3 specs of the table above, in pipeline order."""
    blocks = [LayerSpec(Block, shape, layers, recompute_attention) for _ in range(shape.n_layer)]
    if not shape.tie_embeddings:
        return [
            LayerSpec(GPTEmbedding, shape, layers),
            *blocks,
            LayerSpec(FinalNorm, shape, layers),
            LayerSpec(OutputHead, shape, layers),
        ]
    return [
        TiedLayerSpec(TIED_KEY, GPTEmbedding, shape, layers, position=True, tied_weight_attr=["wte.weight"]),
        *blocks,
        LayerSpec(FinalNorm, shape, layers),
        TiedLayerSpec(
            TIED_KEY, GPTEmbedding, shape, layers, position=False, forward_fn=lm_head, tied_weight_attr=["wte.weight"]
        ),
    ]


class GPTPipe(PipelineModule):
    """``PipelineModule`` whose tied-weight broadcast runs without autograd.

    DeepSpeed broadcasts the tied parameters in place from the first to the last stage at
    construction (and after loading a checkpoint) with autograd on; c10d's broadcast has no autograd
    kernel, so torch attaches a fallback to the parameter and warns at every later backward that it
    "may lead to silently incorrect behavior". The copy is a plain data transfer: run it under
    ``no_grad``. (The class name must not be DeepSpeed's GPTModelPipe / GPT2ModelPipe, which its
    engine special-cases.) The override of DeepSpeed's private method is checked against the DeepSpeed
    version in ``trainer.runtime.compat`` (why it stays an override: see there).
    """

    def __init__(self, *args, **kwargs):
        check_tied_weight_sync()  # before PipelineModule.__init__ calls the method
        super().__init__(*args, **kwargs)

    def _synchronize_tied_weights(self) -> None:
        with torch.no_grad():
            super()._synchronize_tied_weights()


def fuse_head_loss(module: PipelineModule) -> bool:
    """On the last stage, the head and the loss in one chunked pass (``trainer.model.fused_loss``): the head
    layer passes its input on and the stage's loss function applies the head's weight (the tied embedding's
    copy or ``lm_head``), so the gradient reaches the same parameter. Whether this stage has the head."""
    if module.stage_id != module.num_stages - 1:
        return False
    heads = [m for m in module.modules() if isinstance(m, OutputHead)]
    owner = heads[0] if heads else module.tied_modules[TIED_KEY]
    weight_holder = owner.lm_head if heads else owner.wte
    owner.fused_loss = True
    module.loss_fn = partial(_fused_loss, owner.layers, weight_holder)
    return True


def _fused_loss(layers: LayerProvider, head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return layers.fused_head_loss(x, head, targets)


def build_pipeline_module(
    shape: ModelShape,
    layers: LayerProvider,
    dims: ParallelDims,
    seed: int,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    recompute_attention: bool = False,
) -> PipelineModule:
    """This stage's part of the GPT, initialised as the dense GPT of the same ``seed`` would be.

    Collective over the world (DeepSpeed creates its process grid and the tied-weight groups), so
    every rank calls it with the same arguments, after ``deepspeed.init_distributed`` and after
    ``layers`` was built on the tp group of ``build_mesh(dims)``. Needs ``LOCAL_RANK`` in the
    environment (DeepSpeed moves the stage to that device).

    partition_method: "parameters" balances the trainable parameter count per stage (the embedding and
        the head count V·h each, so the end stages get fewer blocks); "uniform" gives every stage the
        same number of layers of the n_layer + 3. The cut DeepSpeed makes is
        ``shape.stage_bounds(dims.tp, dims.pp, partition_method)`` (trainer/model/shape.py, which the planner
        predicts stages from; tests/parallel/test_pipeline_partition.py checks the two agree on these specs).
    activation_checkpoint_interval: k > 0 recomputes activations in backward for each run of k
        consecutive layers of a stage that are all ``Block``s (DeepSpeed's reentrant checkpoint; a run
        that contains the embedding, ln_f or the head is not checkpointed -- the reentrant function
        would cut the gradient to a first layer whose input, the ids, cannot require grad). 0 = off.
    recompute_attention: every ``Block`` recomputes its attention core in backward (selective recompute).
    """
    if partition_method not in PIPELINE_PARTITIONS:
        raise ValueError(f"partition_method={partition_method!r}: must be one of {PIPELINE_PARTITIONS}")
    if activation_checkpoint_interval < 0:
        raise ValueError(f"activation_checkpoint_interval={activation_checkpoint_interval}: must be >= 0")
    if layers.tp_size != dims.tp:
        raise ValueError(f"the layer provider splits over tp={layers.tp_size} ranks but dims.tp={dims.tp}")
    module = GPTPipe(
        layers=layer_specs(shape, layers, recompute_attention),
        topology=dims.deepspeed_topology(),
        loss_fn=layers.cross_entropy,  # (logits, targets) -> mean loss; vocab-parallel under TP
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=[Block.__name__],
    )
    init_pipeline_weights(module, seed, shape.n_layer)
    return module


# --- names and initialisation ------------------------------------------------------------------


def dense_prefix(position: int, n_layer: int) -> str:
    """Path in the dense GPT of the module at pipeline ``position`` ("" for the embedding, ln_f, head)."""
    if not 0 <= position <= n_layer + 2:
        raise ValueError(f"pipeline position {position} outside 0..{n_layer + 2}")
    return f"blocks.{position - 1}" if 1 <= position <= n_layer else ""


def dense_param_name(pipe_name: str, n_layer: int) -> str:
    """A ``PipelineModule`` parameter name -> the same parameter's name in the dense GPT.

    tied_modules.embed.wte.weight -> wte.weight       (either stage's copy)
    tied_modules.embed.wpe.weight -> wpe.weight
    3.attn.qkv.weight             -> blocks.2.attn.qkv.weight
    <n_layer+1>.ln_f.bias         -> ln_f.bias
    """
    if pipe_name.startswith(TIED_PREFIX):
        return pipe_name[len(TIED_PREFIX) :]
    head, _, rest = pipe_name.partition(".")
    if not head.isdigit() or not rest:
        raise ValueError(f"{pipe_name!r} is not a parameter name of the GPT pipeline")
    prefix = dense_prefix(int(head), n_layer)
    return f"{prefix}.{rest}" if prefix else rest


def dense_named_parameters(module: PipelineModule, n_layer: int) -> Iterable[tuple[str, nn.Parameter]]:
    """(dense GPT name, parameter) for every parameter this stage holds (shards under TP)."""
    for name, param in module.named_parameters():
        yield dense_param_name(name, n_layer), param


@torch.no_grad()
def init_pipeline_weights(module: PipelineModule, seed: int, n_layer: int) -> None:
    """Draw this stage's parameters as ``GPT(shape, layers, seed)`` draws them (same names, same
    generator seeds), whatever the partition. The two copies of the tied embedding get the same
    draw, "wte.weight", so they start equal without a broadcast."""
    for module_ in module.tied_modules.values():
        init_weights(module_, seed, n_layer, prefix="")
    for name, child in module.named_children():
        if name.isdigit():  # this stage's non-tied layers, registered under their pipeline position
            init_weights(child, seed, n_layer, prefix=dense_prefix(int(name), n_layer))


# --- DeepSpeed configuration ------------------------------------------------------------------


def pipeline_config(dims: ParallelDims, sequence_parallel: bool) -> dict[str, Any]:
    """The ``"pipeline"`` section of the DeepSpeed config.

    ``pipe_partitioned`` / ``grad_partitioned`` send 1/tp of each activation / gradient between stages
    and all-gather it over the tp group on arrival. That is only valid when the tensor is the same on
    every tp rank: true for the replicated (B, T, h) activations of plain TP (the row-parallel layers
    all-reduce them; the backward of ``copy_to_tp`` all-reduces their gradients), false under sequence
    parallelism, where each tp rank holds a different (B, T/tp, h) chunk. At tp=1 DeepSpeed ignores
    both flags.
    """
    partitioned = dims.tp > 1 and not sequence_parallel
    return {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}


# --- gradient norm ----------------------------------------------------------------------------


def pipeline_grad_norm(params: Iterable[nn.Parameter], mpu) -> torch.Tensor:
    """||g||₂ over one model replica under tp × pp, each parameter counted once:

        ||g||² = Σ_stages [ Σ_{sharded p} Σ_{tp ranks} ||g_p,shard||² + Σ_{replicated p} ||g_p||² (tp rank 0) ]

    sharded = ``tensor_model_parallel`` parameters, summed from every tp rank; replicated ones
    (LayerNorm, row-parallel biases, wpe, all parameters at tp=1) from tp rank 0 of each stage; the
    last stage's copy of the tied embedding (``ds_pipe_replicated``) is skipped. Local sums are
    all-reduced over ``mpu.get_model_parallel_group()`` (tp × pp: the ranks of one replica); ``mpu``
    is DeepSpeed's ``PipelineParallelGrid`` (``engine.mpu``) or a ``Mesh``. Gradients must already be
    reduced over dp and over the tied copies. Returns a 0-dim float32 tensor on the gradients' device.
    """
    group = mpu.get_model_parallel_group()
    total = local_grad_squares(params, mpu.get_tensor_model_parallel_rank() == 0, _device(group))
    dist.all_reduce(total, group=group)
    return total.sqrt()


def _device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def install_pipeline_clipping(engine) -> bool:
    """Make a ``PipelineEngine`` without ZeRO clip by ``pipeline_grad_norm`` and report that norm.

    DeepSpeed 0.19.8 is right at ZeRO-1 (tested) and, by its source, with its bf16/fp16 optimizers:
    their norms take the replicated parameters from *tensor*-parallel rank 0, skip
    ``ds_pipe_replicated`` and sum over the model-parallel group, and ``engine.get_global_grad_norm()``
    returns the value. With plain fp32 and
    ZeRO-0 it is not: ``clip_fp32_gradients`` -> ``runtime.utils.clip_grad_norm_`` takes replicated
    parameters from *model*-parallel rank 0 only (the first stage's tp rank 0), so at pp > 1 it drops
    every other stage's replicated gradients -- at tp=1 every gradient of stages 1..pp-1 -- and clips by
    the wrong norm; nor does it keep the norm (``get_global_grad_norm()`` is None).

    This replaces the engine's ``clip_fp32_gradients`` (called in the optimizer step when
    ``gradient_clipping`` > 0, ZeRO-0, fp32) by one that clips by ``pipeline_grad_norm`` and keeps it
    for ``get_global_grad_norm()`` (``trainer.runtime.compat.replace_fp32_clipping``, for the run).
    Returns whether it did; a no-op elsewhere. With clipping off and ZeRO-0 the norm is not computed
    (as in DeepSpeed).
    """
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False

    def clip() -> torch.Tensor:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = pipeline_grad_norm(params, engine.mpu)
        # DeepSpeed's coefficient: min(1, max_norm / (norm + 1e-6)); no host sync.
        coef = (engine.gradient_clipping() / (norm + 1e-6)).clamp(max=1.0)
        if params:
            torch._foreach_mul_([p.grad for p in params], coef)
        return norm  # what get_global_grad_norm() returns (float() works on it)

    replace_fp32_clipping(engine, clip)
    return True
