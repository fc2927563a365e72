"""Validation, run once before any process group exists: every check raises ``ConfigError`` with one
line naming the key, its value and the fix. Also the batch math derived from a valid config.
"""

from __future__ import annotations

import os
from typing import Any

from trainer.config.schema import (
    DP_SYNCS,
    HOST_HEAPS,
    MIXED_PRECISIONS,
    OBJECTIVES,
    OUTER_OPTIMIZERS,
    PRECISIONS,
    SWITCHES,
    ZERO_STAGES,
    BatchPlan,
    Config,
    ConfigError,
    ParallelConfig,
)
from trainer.model.shape import MLPS, NORMS, PIPELINE_PARTITIONS, POSITIONS, RECOMPUTE, ModelShape


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


def parallel_overrides(**values) -> list[str]:
    """The command-line overrides that set these ``parallel.*`` fields (booleans as Hydra spells them);
    a name that is not a ``ParallelConfig`` field is a programming error."""
    from dataclasses import fields

    known = {f.name for f in fields(ParallelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"not ParallelConfig fields: {unknown}")
    spell = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return [f"parallel.{key}={spell(value)}" for key, value in values.items()]


def recompute_plan(p: ParallelConfig) -> tuple[str, int]:
    """(none | selective | full, blocks per recomputed run) of a parallel config, at any pp. An interval
    > 0 alone has always meant full recompute; 0 under recompute=full means every block on its own."""
    mode = "full" if p.recompute == "none" and p.activation_checkpoint_interval > 0 else p.recompute
    return mode, max(p.activation_checkpoint_interval, 1)


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
    _validate_architecture(m)
    for key in ("tp", "pp", "micro_batch", "global_batch"):
        _positive(f"parallel.{key}", getattr(p, key))
    _validate_tensor_parallel(cfg)
    _validate_pipeline(cfg)
    _validate_recompute(cfg)
    _validate_dp_sync(p)
    validate_auto_keys(p)
    if p.auto and not p.chosen.name:  # an entry point that forgot trainer.analysis.planner.auto.resolve_parallel
        raise ConfigError("parallel.auto", True, "not resolved into a layout before validation")
    if p.zero_stage not in ZERO_STAGES:
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
    if t.host_heap not in HOST_HEAPS:
        raise ConfigError("train.host_heap", t.host_heap, f"must be one of {', '.join(HOST_HEAPS)}")
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
    if t.profile_start < 0:
        raise ConfigError("train.profile_start", t.profile_start, "must be >= 0 (a 1-based step; 0 = no profile)")
    _positive("train.profile_steps", t.profile_steps)
    if t.profile_start and t.profile_start + t.profile_steps - 1 > t.steps:
        raise ConfigError(
            "train.profile_start", t.profile_start, f"the profiled steps must end by train.steps={t.steps}"
        )
    if t.profile_start and not all(0 <= r < world_size for r in t.profile_ranks):
        raise ConfigError("train.profile_ranks", list(t.profile_ranks), f"ranks are 0..{world_size - 1}")
    if t.save_interval < -1:
        raise ConfigError("train.save_interval", t.save_interval, "must be >= -1 (-1 = never)")
    _positive("train.sample_tokens", t.sample_tokens)
    if t.sample_prompts and t.sample_tokens >= m.seq_len:  # a prompt needs a token of the context too
        raise ConfigError("train.sample_tokens", t.sample_tokens, f"must be < model.seq_len={m.seq_len} to sample")
    for prompt in t.sample_prompts:
        if not prompt.strip():
            raise ConfigError("train.sample_prompts", prompt, "a prompt must hold some text")
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        bad = next(k for k in ("warmup_steps", "weight_decay", "grad_clip") if getattr(o, k) < 0)
        raise ConfigError(f"optim.{bad}", getattr(o, bad), "must be >= 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", list(o.betas), "each beta must be in [0, 1)")
    _validate_device(cfg)
    _validate_speed(cfg)
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
    if p.pipeline_partition not in PIPELINE_PARTITIONS:
        fix = f"must be one of {', '.join(PIPELINE_PARTITIONS)}"
        raise ConfigError("parallel.pipeline_partition", p.pipeline_partition, fix)
    if p.activation_checkpoint_interval < 0:
        raise ConfigError("parallel.activation_checkpoint_interval", p.activation_checkpoint_interval, "must be >= 0")


def _validate_dp_sync(p: ParallelConfig) -> None:
    """The synchronisation schemes other than DeepSpeed's own all-reduce keep whole fp32 gradients and
    parameters on every rank and step them outside the engine (trainer.parallel.dp_sync)."""
    if p.dp_sync not in DP_SYNCS:
        raise ConfigError("parallel.dp_sync", p.dp_sync, f"must be one of {', '.join(DP_SYNCS)}")
    if p.outer_optimizer not in OUTER_OPTIMIZERS:
        raise ConfigError(
            "parallel.outer_optimizer", p.outer_optimizer, f"must be one of {', '.join(OUTER_OPTIMIZERS)}"
        )
    _positive("parallel.sync_interval", p.sync_interval)
    _positive("parallel.outer_lr", p.outer_lr)
    if not 0 <= p.outer_momentum < 1:
        raise ConfigError("parallel.outer_momentum", p.outer_momentum, "must be in [0, 1)")
    if p.dp_sync != "local_sgd":
        for key, default in (("sync_interval", 1), ("outer_optimizer", "none")):
            if getattr(p, key) != default:
                raise ConfigError(
                    f"parallel.{key}", getattr(p, key), "only local_sgd reads it; set parallel.dp_sync=local_sgd"
                )
    if p.dp_sync == "allreduce":
        return
    refusals = (
        (p.zero_stage > 0, "needs parallel.zero_stage=0 (ZeRO partitions what the scheme keeps whole on every rank)"),
        (p.pp > 1, "needs parallel.pp=1 (the pipeline engine reduces gradients inside its own schedule)"),
        (p.precision != "fp32", "needs parallel.precision=fp32 (the scheme moves the fp32 gradients and parameters)"),
    )
    for refused, fix in refusals:
        if refused:
            raise ConfigError("parallel.dp_sync", p.dp_sync, f"{fix}; or use parallel.dp_sync=allreduce")


# What parallel=auto chooses (trainer.analysis.planner.auto); the micro-batch too, unless one is given.
AUTO_CHOSEN = ("tp", "pp", "zero_stage", "sequence_parallel", "recompute", "activation_checkpoint_interval")


def validate_auto_keys(p: ParallelConfig) -> None:
    if p.objective not in OBJECTIVES:
        raise ConfigError("parallel.objective", p.objective, f"must be one of {', '.join(OBJECTIVES)}")
    if p.auto:
        return
    default = ParallelConfig()
    for key in ("objective", "cluster"):
        if getattr(p, key) != getattr(default, key):
            raise ConfigError(f"parallel.{key}", getattr(p, key), "only parallel=auto reads it; add parallel=auto")


def validate_auto_degrees(p: ParallelConfig) -> None:
    """Before the planner chooses: a degree given as well (away from its default) contradicts it. The planner
    predicts DeepSpeed's own gradient all-reduce, so the other dp_sync schemes are refused too."""
    default = ParallelConfig()
    for key in (*AUTO_CHOSEN, "dp_sync"):
        if getattr(p, key) != getattr(default, key):
            raise auto_conflict(f"parallel.{key}", getattr(p, key))


def auto_conflict(key: str, value: Any) -> ConfigError:
    return ConfigError(key, value, "parallel=auto chooses the layout; drop it, or name a layout instead of auto")


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
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("parallel.precision", precision, "this GPU has no bf16; use fp16 or fp32")


def _validate_speed(cfg: Config) -> None:
    """speed.*: the switches, what compile and flash attention run with, and the DeepSpeed passthrough."""
    import torch

    from trainer.runtime.ds_config import extra_problem

    s, p = cfg.speed, cfg.parallel
    for key in ("fused_adamw", "overlap_comm", "flat_optimizer", "flash_attention"):
        if str(getattr(s, key)).lower() not in SWITCHES:
            raise ConfigError(f"speed.{key}", getattr(s, key), f"must be one of {', '.join(SWITCHES)}")
    if s.compile and (p.tp > 1 or p.pp > 1 or p.zero_stage == 3):
        fix = "torch.compile of the blocks is checked at tp=1, pp=1 and ZeRO <= 2 only; set speed.compile=false"
        raise ConfigError("speed.compile", True, fix)
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if str(s.flash_attention).lower() == "true" and not (cuda and p.precision in MIXED_PRECISIONS):
        raise ConfigError("speed.flash_attention", True, "flash needs a CUDA device and bf16/fp16; use auto or false")
    _probe_flash(cfg, cuda)
    problem = extra_problem(dict(s.deepspeed_extra)) if s.deepspeed_extra else None
    if problem:
        raise ConfigError(f"speed.deepspeed_extra.{problem[0]}", _at(s.deepspeed_extra, problem[0]), problem[1])


def _at(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _probe_flash(cfg: Config, cuda: bool) -> None:
    """Where flash attention is required, run it once on this rank's GPU at the model's attention shape."""
    from trainer.runtime.speed import flash_required, probe_flash

    m, p = cfg.model, cfg.parallel
    if not flash_required(cfg.speed, p.precision, cuda):
        return
    import torch

    shape = ModelShape.from_config(m)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = torch.bfloat16 if p.precision == "bf16" else torch.float16
    reason = probe_flash(device, dtype, m.n_head // p.tp, shape.kv_heads // p.tp, shape.head_dim, m.dropout)
    if reason:
        fix = f"the flash kernel cannot run head size {shape.head_dim} here ({reason}); set speed.flash_attention=false"
        raise ConfigError("speed.flash_attention", cfg.speed.flash_attention, fix)


def _validate_architecture(m) -> None:
    for key, allowed in (("mlp", MLPS), ("norm", NORMS), ("position", POSITIONS)):
        if getattr(m, key) not in allowed:
            raise ConfigError(f"model.{key}", getattr(m, key), f"must be one of {', '.join(allowed)}")
    for key in ("norm_eps", "rope_theta", "n_kv_head", "ffn_hidden"):
        if getattr(m, key) is not None:
            _positive(f"model.{key}", getattr(m, key))
    if m.n_kv_head is not None and m.n_head % m.n_kv_head:
        raise ConfigError(
            "model.n_kv_head", m.n_kv_head, f"must divide model.n_head={m.n_head} (query heads share a key/value head)"
        )
    if m.position == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.position", "rope", f"needs an even head size, n_embd/n_head={m.n_embd // m.n_head}")


def _validate_tensor_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    shape = ModelShape.from_config(m)
    if m.n_head % p.tp:
        raise ConfigError("parallel.tp", p.tp, f"must divide model.n_head={m.n_head} (heads are split across tp ranks)")
    if shape.kv_heads % p.tp:
        raise ConfigError(
            "parallel.tp",
            p.tp,
            f"must divide the key/value heads, model.n_kv_head={shape.kv_heads} (each tp rank holds whole ones); "
            f"use a tp that divides {shape.kv_heads}",
        )
    if shape.ffn_size % p.tp:
        raise ConfigError("parallel.tp", p.tp, f"must divide the MLP inner size {shape.ffn_size} (model.ffn_hidden)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "needs parallel.tp > 1; set it to false")
    if p.sequence_parallel and m.seq_len % p.tp:
        raise ConfigError(
            "parallel.sequence_parallel", True, f"needs model.seq_len={m.seq_len} divisible by parallel.tp={p.tp}"
        )


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    validate_source(d)
    if d.tokenizer.train_bytes < 0:
        raise ConfigError("data.tokenizer.train_bytes", d.tokenizer.train_bytes, "must be >= 0 (0 = all the text)")
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


def validate_source(d) -> None:
    """Where the text comes from and how it is split (``d`` a DataConfig): what any preparation needs."""
    if d.source not in ("pystdlib", "files", "hub", "megatron"):
        raise ConfigError("data.source", d.source, "must be pystdlib, files, hub or megatron")
    if d.source == "megatron":
        validate_megatron(d)
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
    if d.num_proc < 0:
        raise ConfigError("data.num_proc", d.num_proc, "must be >= 0 (0 = one per core)")


def validate_megatron(d, where: str = "data") -> None:
    """Megatron .bin/.idx files: both present, the MMIDIDX header (magic, version, an integer dtype), the
    same dtype for train and val, and the tokenizer they were made with. ``where``: the source's key
    (``data``, or ``data.blend[i]`` for a blend entry)."""
    from trainer.data.indexed import read_header

    m = d.megatron
    if not m.train_prefix:
        raise ConfigError(f"{where}.megatron.train_prefix", m.train_prefix, "give the prefix of <prefix>.bin/.idx")
    headers = {}
    for key, prefix in (("train_prefix", m.train_prefix), ("val_prefix", m.val_prefix)):
        if prefix:
            try:
                headers[key] = read_header(prefix)
            except ValueError as err:
                raise ConfigError(f"{where}.megatron.{key}", prefix, str(err)) from None
    if "val_prefix" in headers and headers["val_prefix"].dtype != headers["train_prefix"].dtype:
        raise ConfigError(
            f"{where}.megatron.val_prefix",
            m.val_prefix,
            f"dtype {headers['val_prefix'].dtype}, the train files' is {headers['train_prefix'].dtype}",
        )
    if d.tokenizer.source in ("", "train"):
        raise ConfigError(
            "data.tokenizer.source",
            d.tokenizer.source,
            f"{where}: Megatron files need the tokenizer they were made with (tokenizer.json or its directory)",
        )


def _validate_logging(cfg: Config) -> None:
    mode = cfg.logging.wandb.mode
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError("logging.wandb.mode", mode, "must be auto, online, offline or disabled")
