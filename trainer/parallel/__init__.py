"""Tensor (Megatron-style) and sequence parallelism: rank layout and process groups (``dims``),
counted collectives (``mappings``), shard-sized layers and their provider (``layers``), and the
vocab-parallel loss (``loss``)."""

from trainer.parallel.dims import Coords, Mesh, ParallelDims, build_mesh
from trainer.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    register_sequence_parallel_grad_hooks,
    sequence_parallel_params,
)
from trainer.parallel.loss import vocab_parallel_cross_entropy
from trainer.parallel.mappings import CommRecord, CommStats

__all__ = [
    "ColumnParallelLinear",
    "CommRecord",
    "CommStats",
    "Coords",
    "Mesh",
    "ParallelDims",
    "RowParallelLinear",
    "TensorParallelLayers",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "build_mesh",
    "register_sequence_parallel_grad_hooks",
    "sequence_parallel_params",
    "vocab_parallel_cross_entropy",
]
