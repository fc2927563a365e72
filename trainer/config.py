"""Typed configuration schema, validation and derived batch math.

Hydra composes YAML from ``conf/`` on top of these dataclasses, so every field is typed and
overridable (``parallel.zero_stage=2``). ``validate`` runs once, before any process group exists,
and raises ``ConfigError`` with one line naming the key, its value and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class BadInput(Exception):
    """Input a run cannot start with (config or data). ``str(err)`` is one line for the user."""


class ConfigError(BadInput, ValueError):
    """A configuration a run cannot start with. ``str(err)`` is the one-line message for the user."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


@dataclass
class ModelConfig:
    name: str = MISSING
    n_layer: int = MISSING  # transformer blocks
    n_embd: int = MISSING  # hidden size h
    n_head: int = MISSING  # attention heads; head size = n_embd / n_head
    seq_len: int = MISSING  # context length = number of learned position embeddings
    vocab_size: int = MISSING  # embedding rows; the tokenizer's vocabulary must fit in it
    dropout: float = 0.0  # on attention probabilities, residual branches and embeddings
    # Pad the embedding to a multiple of this (times tp), as Megatron does, for fast matmuls.
    # 1 keeps the vocabulary exactly as published (needed for the analytic parameter count).
    make_vocab_size_divisible_by: int = 1


@dataclass
class ParallelConfig:
    name: str = "single"
    tp: int = 1  # tensor-parallel degree (ranks that split each layer)
    pp: int = 1  # pipeline-parallel degree (stages)
    sequence_parallel: bool = False  # split LayerNorm/dropout activations along the sequence (needs tp > 1)
    zero_stage: int = 0  # DeepSpeed ZeRO: 0 off, 1 optimizer states, 2 +gradients, 3 +parameters
    micro_batch: int = 4  # samples per rank per forward/backward
    global_batch: int = 8  # samples per optimizer step over all data-parallel ranks
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    # Pipeline only: how layers are spread over stages -- "parameters" balances parameter counts
    # (embedding and head weigh in), "uniform" gives every stage the same number of layers.
    pipeline_partition: str = "parameters"
    activation_checkpoint_interval: int = 0  # full recompute in runs of k blocks; 0 = off (1 under recompute=full)
    # Activation recompute in backward (Korthikanti et al. 2022): none | selective (the attention
    # core only) | full (everything but each run's input). recompute=none with an interval > 0 is full.
    recompute: str = "none"


@dataclass
class TokenizerConfig:
    # "train": fit a byte-level BPE on the corpus; otherwise a path to tokenizer.json or an HF directory.
    source: str = "train"
    vocab_size: int = 8192  # for "train": target vocabulary (must be <= model.vocab_size)


@dataclass
class DataConfig:
    name: str = "pystdlib"
    # pystdlib: this Python's own standard library sources (present on every machine, no download);
    # files: local text/jsonl files or directories in `paths`; hub: an HF hub data set `hub_name`, streamed.
    source: str = "pystdlib"
    paths: list[str] = field(default_factory=list)
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "train"
    text_field: str = "text"  # the column holding text, for jsonl and hub sources
    max_documents: int = -1  # -1 = all; otherwise only the first N documents (hub streams are unbounded)
    val_fraction: float = 0.05  # every k-th document is held out, k = round(1/val_fraction), in corpus order
    cache_dir: str = "data/cache"  # prepared token files live here, keyed by a hash of their inputs
    num_proc: int = 1  # worker processes for tokenization (1 is fastest on 2 cores)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate after warmup
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only, not to biases, LayerNorm or embeddings' positions
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables


@dataclass
class TrainConfig:
    name: str = "default"
    steps: int = 1000  # optimizer steps
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 10  # steps between metric lines (metrics.jsonl has every step)
    eval_interval: int = 200  # steps between validation passes; 0 = only at the end
    eval_batches: int = 10  # global batches of validation samples: the same set at every layout
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end, -1 = never
    # "" = start fresh; "auto" = continue from the newest checkpoint of this run directory (fresh
    # if there is none); or a path to a checkpoints directory or one of its step_<n> directories.
    resume: str = ""
    keep_last: int = 0  # published checkpoints to keep (the newest); 0 = all
    # Weights to start from when there is nothing to resume: a checkpoint step directory of any
    # layout, or one written by ``python -m trainer.import_hf`` (fresh optimizer and schedule).
    init_from: str = ""
    # Seconds a collective may wait for its peers; a dead rank then stops the others instead of
    # hanging them (the launcher exits non-zero).
    collective_timeout_s: int = 600
    # Consecutive steps with a non-finite loss or gradient (each skipped) before the run stops; 0 = never.
    max_skipped_steps: int = 10
    # Fault injection for tests: optimizer steps (1-based) whose activations are made NaN.
    inject_nan_steps: list[int] = field(default_factory=list)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online if an API key is set, else offline) | online | offline | disabled
    project: str = "gpt-trainer"
    entity: str = ""
    name: str = ""  # run name; empty = the run directory's name
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    name: str = "default"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # rich progress bar on rank 0 when stdout is a terminal


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = ""  # filled by the entry point from Hydra's output directory


PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes derived from the config and the world size, solved in one place."""

    dp: int  # data-parallel degree
    micro_batch: int  # samples per rank per micro-step
    grad_accum: int  # micro-steps per optimizer step
    global_batch: int  # micro_batch * grad_accum * dp
    tokens_per_step: int


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp)
    per_micro_step = p.micro_batch * dp
    if p.global_batch % per_micro_step:
        raise ConfigError(
            "parallel.global_batch",
            p.global_batch,
            f"must be a multiple of micro_batch*dp = {p.micro_batch}*{dp} = {per_micro_step}",
        )
    accum = p.global_batch // per_micro_step
    return BatchPlan(dp, p.micro_batch, accum, p.global_batch, p.global_batch * cfg.model.seq_len)


def adopt_mpi_env() -> None:
    """Ranks started by mpirun (``launch/multinode.sh --launcher openmpi``) carry Open MPI's variables, not
    the RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE that the deepspeed launcher sets: copy them over.
    MASTER_ADDR and MASTER_PORT arrive forwarded by the launch script."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return
    for ours, theirs in (
        ("RANK", "OMPI_COMM_WORLD_RANK"),
        ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
        ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ):
        os.environ[ours] = os.environ[theirs]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, value, "must be > 0")


def validate(cfg: Config, world_size: int) -> BatchPlan:
    """Check everything that can be checked before a process group starts; return the batch plan."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
    for key in ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size", "make_vocab_size_divisible_by"):
        _positive(f"model.{key}", getattr(m, key))
    if m.n_embd % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", m.dropout, "must be in [0, 1)")
    for key in ("tp", "pp", "micro_batch", "global_batch"):
        _positive(f"parallel.{key}", getattr(p, key))
    _validate_tensor_parallel(cfg)
    _validate_pipeline(cfg)
    _validate_recompute(cfg)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", p.zero_stage, "must be 0, 1, 2 or 3")
    if p.precision not in PRECISIONS:
        raise ConfigError("parallel.precision", p.precision, f"must be one of {', '.join(PRECISIONS)}")
    if world_size % (p.tp * p.pp):
        raise ConfigError("parallel.tp", p.tp, f"tp*pp={p.tp * p.pp} must divide the world size {world_size}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("train.device", t.device, "must be auto, cpu or cuda")
    _positive("train.steps", t.steps)
    _positive("train.log_interval", t.log_interval)
    _positive("train.eval_batches", t.eval_batches)
    _positive("train.collective_timeout_s", t.collective_timeout_s)
    if t.eval_interval < 0:
        raise ConfigError("train.eval_interval", t.eval_interval, "must be >= 0 (0 = only at the end)")
    if t.resume not in ("", "auto") and not os.path.isdir(t.resume):
        raise ConfigError("train.resume", t.resume, "no such checkpoint directory; use auto, a path, or ''")
    if t.init_from and not os.path.isfile(os.path.join(t.init_from, "meta.json")):
        raise ConfigError(
            "train.init_from", t.init_from, "not a checkpoint step directory (no meta.json); give a step_<n> directory"
        )
    if t.max_skipped_steps < 0:
        raise ConfigError("train.max_skipped_steps", t.max_skipped_steps, "must be >= 0 (0 = never stop)")
    if any(step < 1 for step in t.inject_nan_steps):
        raise ConfigError("train.inject_nan_steps", t.inject_nan_steps, "steps are counted from 1")
    if t.keep_last < 0:
        raise ConfigError("train.keep_last", t.keep_last, "must be >= 0 (0 = keep every checkpoint)")
    if t.save_interval < -1:
        raise ConfigError("train.save_interval", t.save_interval, "must be >= -1 (-1 = never)")
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        bad = next(k for k in ("warmup_steps", "weight_decay", "grad_clip") if getattr(o, k) < 0)
        raise ConfigError(f"optim.{bad}", getattr(o, bad), "must be >= 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", list(o.betas), "each beta must be in [0, 1)")
    _validate_device(cfg)
    _validate_data(cfg)
    _validate_logging(cfg)
    return batch_plan(cfg, world_size)


def _validate_pipeline(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if p.pp > m.n_layer:
        raise ConfigError("parallel.pp", p.pp, f"more stages than model.n_layer={m.n_layer}; use pp <= n_layer")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            "parallel.zero_stage", p.zero_stage, "DeepSpeed's pipeline engine supports ZeRO 0 or 1; use zero_stage<=1"
        )
    if p.pipeline_partition not in ("parameters", "uniform"):
        raise ConfigError("parallel.pipeline_partition", p.pipeline_partition, "must be parameters or uniform")
    if p.activation_checkpoint_interval < 0:
        raise ConfigError("parallel.activation_checkpoint_interval", p.activation_checkpoint_interval, "must be >= 0")


def _validate_recompute(cfg: Config) -> None:
    p = cfg.parallel
    if p.recompute not in RECOMPUTE:
        raise ConfigError("parallel.recompute", p.recompute, f"must be one of {', '.join(RECOMPUTE)}")
    if p.recompute == "selective" and p.activation_checkpoint_interval > 0:
        fix = "an interval means full recompute; set parallel.activation_checkpoint_interval=0 or recompute=full"
        raise ConfigError("parallel.recompute", p.recompute, fix)


def _validate_device(cfg: Config) -> None:
    import torch

    device, precision = cfg.train.device, cfg.parallel.precision
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("train.device", device, "no CUDA device is visible; use train.device=auto or cpu")
    on_gpu = has_cuda and device != "cpu"
    if precision == "fp16" and not on_gpu:
        raise ConfigError("parallel.precision", precision, "fp16 needs a GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("parallel.precision", precision, "this GPU has no bf16; use fp16 or fp32")


def _validate_tensor_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.n_head % p.tp:
        raise ConfigError("parallel.tp", p.tp, f"must divide model.n_head={m.n_head} (heads are split across tp ranks)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "needs parallel.tp > 1; set it to false")
    if p.sequence_parallel and m.seq_len % p.tp:
        raise ConfigError(
            "parallel.sequence_parallel", True, f"needs model.seq_len={m.seq_len} divisible by parallel.tp={p.tp}"
        )


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.source not in ("pystdlib", "files", "hub"):
        raise ConfigError("data.source", d.source, "must be pystdlib, files or hub")
    if d.source == "files":
        if not d.paths:
            raise ConfigError("data.paths", list(d.paths), "give at least one text/jsonl file or directory")
        for path in d.paths:
            if not os.path.exists(path):
                raise ConfigError("data.paths", path, "no such file or directory")
    if d.source == "hub" and not d.hub_name:
        raise ConfigError(
            "data.hub_name", d.hub_name, "name the hub data set, e.g. data.hub_name=roneneldan/TinyStories"
        )
    if not 0.0 < d.val_fraction < 0.5:
        raise ConfigError("data.val_fraction", d.val_fraction, "must be in (0, 0.5)")
    _positive("data.num_proc", d.num_proc)
    tok = d.tokenizer
    if tok.source == "train":
        if not 256 < tok.vocab_size <= cfg.model.vocab_size:
            raise ConfigError(
                "data.tokenizer.vocab_size",
                tok.vocab_size,
                f"must be in (256, model.vocab_size={cfg.model.vocab_size}]",
            )
    elif not os.path.exists(tok.source):
        raise ConfigError("data.tokenizer.source", tok.source, "use 'train' or a path to tokenizer.json / a directory")


def _validate_logging(cfg: Config) -> None:
    mode = cfg.logging.wandb.mode
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError("logging.wandb.mode", mode, "must be auto, online, offline or disabled")
