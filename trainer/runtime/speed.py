"""The ``speed.*`` options that act on the built model rather than on DeepSpeed's config (that is
``trainer.runtime.ds_config``): torch.compile of the transformer blocks, and the flash-attention kernel
required on GPUs. Each is decided here once from the config and the device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.config.schema import MIXED_PRECISIONS
from trainer.runtime.ds_config import switch_on

# Flash attention computes in 16 bits only; fp32 attention on a GPU takes the memory-efficient or math kernel.
FLASH_PRECISIONS = MIXED_PRECISIONS


def flash_required(speed: Any, precision: str, cuda: bool) -> bool:
    """Whether every training attention call must run the flash kernel (``speed.flash_attention``): auto
    = on CUDA ranks in bf16/fp16; true = always (validation refuses it elsewhere); false = never."""
    return switch_on(speed.flash_attention, cuda and precision in FLASH_PRECISIONS)


def probe_flash(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, dropout: float):
    """Run the flash kernel once at the model's attention shape (one rank's heads); None if it ran, else the
    reason torch gives (an unsupported GPU, head size or dtype)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, 128, head_dim, device=device, dtype=dtype) for _ in range(2))
    try:
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            warnings.simplefilter("always")
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=heads != kv_heads
            )
            out.sum().backward()
    except RuntimeError as err:
        # torch explains why in the warnings it raised while choosing, the error itself says only "no kernel"
        reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught] or [str(err).splitlines()[0]]
        return "; ".join(reasons)
    return None


def use_flash(model: nn.Module) -> int:
    """Make every attention module of ``model`` (a GPT or a pipeline stage) run its training attention under
    ``sdpa_kernel(FLASH_ATTENTION)``: a call flash cannot run fails instead of falling back. The count set."""
    from torch.nn.attention import SDPBackend

    from trainer.model.gpt import CausalSelfAttention

    modules = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    for module in modules:
        module.sdpa_backends = [SDPBackend.FLASH_ATTENTION]
    return len(modules)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer block of ``model`` in place (``nn.Module.compile``: the module and
    its parameters stay the ones DeepSpeed and the checkpoints see). The number compiled."""
    from trainer.model.gpt import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def fuse_loss(model: nn.Module) -> bool:
    """Make ``model`` (a GPT or a pipeline stage) compute its head and loss chunk by chunk
    (``speed.fused_loss``); whether this rank has the head."""
    from trainer.model.gpt import GPT
    from trainer.parallel.pipeline import fuse_head_loss

    if isinstance(model, GPT):
        model.fused_loss = True
        return True
    return fuse_head_loss(model)
