"""Typed configuration schema: every key, its type, default and allowed values, and the errors bad input raises.

Hydra composes YAML from ``conf/`` on top of these dataclasses, so every field is typed and
overridable (``parallel.zero_stage=2``). ``trainer.config.validate.validate`` runs once, before any
process group exists, and raises ``ConfigError`` with one line naming the key, its value and the fix.
"""

from __future__ import annotations

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
    vocab_size: int = MISSING  # embedding rows before padding; the tokenizer's vocabulary must fit in it
    dropout: float = 0.0  # on attention probabilities, residual branches and embeddings
    # Pad the embedding to a multiple of this times tp, as Megatron does (its default, 128): the output head's
    # matmul then runs on aligned tiles (GPT-2's 50257 rows become 50304). Padding rows get -inf logits (in no
    # softmax, loss or argmax) and are left out of Hugging Face exports; 1 pads only to a multiple of tp.
    make_vocab_size_divisible_by: int = 128
    # Architecture (trainer.model.shape): the defaults are GPT-2's; Llama-style models set all of these.
    n_kv_head: int | None = None  # key/value heads: None = n_head; fewer = grouped-query, 1 = multi-query
    ffn_hidden: int | None = None  # MLP inner size; None = 4·n_embd (gelu), 8·n_embd/3 up to 256·k (swiglu)
    mlp: str = "gelu"  # gelu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "learned"  # learned (seq_len embeddings) | rope (rotary, no position parameters)
    rope_theta: float = 10000.0  # rotary base (Llama 2: 1e4, Llama 3: 5e5)
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the output head is the token embedding


@dataclass
class PlannedLayout:
    """A layout ``parallel.auto`` weighed, with the planner's predictions (kept in config.yaml and metrics)."""

    name: str = ""  # tpN-ppN-dpN-zeroK-mbN-<recompute>[-sp]
    memory_gb: float = 0.0  # predicted per rank, GB (1e9 bytes)
    tokens_per_s: float = 0.0  # predicted


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
    # How data-parallel replicas stay in step (trainer.parallel.dp_sync; DP_SYNCS): allreduce = DeepSpeed's
    # gradient all-reduce; parameter_server = gradients sent to dp rank 0, the mean sent back; local_sgd = no
    # gradient sync, parameters averaged every sync_interval steps (through outer_optimizer).
    dp_sync: str = "allreduce"
    sync_interval: int = 1  # local_sgd: H, optimizer steps between parameter averages
    # local_sgd: what the average does (OUTER_OPTIMIZERS): none = the replicas' mean; nesterov = DiLoCo (Douillard
    # et al. 2023): SGD with Nesterov momentum over the averaged delta since the last sync, as the outer gradient.
    outer_optimizer: str = "none"
    outer_lr: float = 0.7  # nesterov: the outer learning rate (DiLoCo's 0.7)
    outer_momentum: float = 0.9  # nesterov: the outer momentum (DiLoCo's 0.9)
    # parallel=auto: the planner (trainer.analysis.planner.auto) chooses tp, pp, ZeRO, recompute, SP and, when
    # micro_batch is 0, the micro-batch for the launched world, model, batch and cluster (conf/cluster/<cluster>).
    auto: bool = False
    objective: str = "throughput"  # auto: throughput (fastest predicted) | memory (least predicted per rank)
    cluster: str = "cpu-local"  # auto: the hardware it plans for (cpu-local: this machine, measured at launch)
    chosen: PlannedLayout = field(default_factory=PlannedLayout)  # set by auto at launch, for the record
    runner_up: PlannedLayout = field(default_factory=PlannedLayout)


@dataclass
class TokenizerConfig:
    # "train": fit a byte-level BPE on the corpus; otherwise a path to tokenizer.json or an HF directory.
    source: str = "train"
    vocab_size: int = 8192  # for "train": target vocabulary (must be > 256 and <= model.vocab_size)
    # for "train": fit on about this many bytes of training text, drawn evenly over the corpus (0 = all).
    # BPE training holds one count per distinct word plus merge tables that grow with them: 1.06 GB on all
    # of 1.05 GB of code, 0.47 GB on the default sample, whose tokenizer gives only 0.4% more tokens.
    train_bytes: int = 256 * 2**20
    # The end-of-text token that separates documents (trained into a new BPE; must exist in a given one).
    eot: str = "<|endoftext|>"


@dataclass
class MegatronConfig:
    """``data.source=megatron``: Megatron/NeoX ``.bin``/``.idx`` files read in place (prefixes without suffix)."""

    train_prefix: str = ""
    val_prefix: str = ""  # "" = the last data.val_fraction of the train files' documents


@dataclass
class BlendSource:
    """One source of ``data.blend``: a conf/data option by name (``data``) or inline source settings."""

    weight: float = 0.0  # > 0; weights are normalised over the blend
    # A conf/data option (pystdlib, shakespeare, ...); inline keys that differ from their defaults override it.
    data: str = ""
    name: str = ""  # the prepared directory's name; default: the option's name, else source<i>
    source: str = "files"
    paths: list[str] = field(default_factory=list)
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "train"
    text_field: str = "text"
    max_documents: int = -1
    megatron: MegatronConfig = field(default_factory=MegatronConfig)  # with source: megatron


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
    num_proc: int = 0  # worker processes that tokenize (0 = one per core); the output does not depend on it
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Sources mixed by weight (one shared tokenizer, each prepared and validated separately); empty = the
    # single source above. See README "Blended data".
    blend: list[BlendSource] = field(default_factory=list)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)  # for source=megatron


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate after warmup
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100  # linear warmup: step k (1-based) uses lr * k / warmup_steps; 0 = none
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Decays every matrix (linear weights, the token embedding/tied head and the position embedding);
    # vectors (biases, LayerNorm weights and biases) are not decayed.
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables


@dataclass
class TrainConfig:
    name: str = "default"
    steps: int = 1000  # optimizer steps
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    # Logged steps: every log_interval-th, the first one (also after a resume) and the last. Only they are
    # measured (phase times, communication, memory) and written to metrics.jsonl, wandb and the console;
    # the steps between run unmeasured and are not recorded (validation passes add their own lines).
    log_interval: int = 10
    eval_interval: int = 200  # steps between validation passes; 0 = only at the end
    eval_batches: int = 10  # global batches of validation samples: the same set at every layout
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end, -1 = never
    # "" = start fresh; "auto" = continue from the newest checkpoint of this run directory (fresh
    # if there is none); or a path to a checkpoints directory or one of its step_<n> directories.
    resume: str = ""
    keep_last: int = 0  # published checkpoints to keep (the newest); 0 = all
    # Checkpoints also hold DeepSpeed's own files (read by DeepSpeed's tools, e.g. zero_to_fp32.py). false: the
    # sharded state alone, half the bytes; a same-layout resume is then exact from it too, at a resharded load's
    # cost (each parameter joined over the data-parallel ranks in turn: slower, more memory; docs/checkpoints.md).
    deepspeed_files: bool = True
    # Weights to start from when there is nothing to resume: a checkpoint step directory of any
    # layout, or one written by ``python -m trainer.import_hf`` (fresh optimizer and schedule).
    init_from: str = ""
    # Seconds a collective may wait for its peers; a dead rank then stops the others instead of
    # hanging them (the launcher exits non-zero).
    collective_timeout_s: int = 600
    # The C heap of CPU ranks (glibc). "lean": every allocation of 1 MiB or more is its own mapping and goes
    # back to the system when freed, so a rank's resident memory follows its live tensors (what lets a
    # model near the machine's memory train; costs CPU speed, docs/checkpoints.md); "glibc": glibc's own
    # threshold, which climbs to 32 MiB and keeps freed temporaries resident; "auto": lean for CPU ranks
    # at ZeRO-3 (chosen to save memory), glibc otherwise. GPU memory is not affected.
    host_heap: str = "auto"
    # Before any process group starts, refuse a layout whose predicted memory per rank (the planner's model
    # states, activations and ZeRO buffers; trainer.training.preflight) exceeds what a rank has. false: start anyway.
    memory_check: bool = True
    # Consecutive steps with a non-finite loss or gradient (each skipped) before the run stops; 0 = never.
    max_skipped_steps: int = 10
    # Fault injection for tests: optimizer steps (1-based) whose activations are made NaN.
    inject_nan_steps: list[int] = field(default_factory=list)
    # torch.profiler over profile_steps optimizer steps from profile_start (1-based; 0 = off) on profile_ranks:
    # a trace and a table of operators by self time in the run directory's profile/ (trainer.training.profiler).
    profile_start: int = 0
    profile_steps: int = 3
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    # After every validation pass rank 0 continues each prompt by sample_tokens tokens, greedily (the most
    # likely token each time, so samples at different steps differ only by what the model learned), and
    # prints them and logs them to metrics.jsonl and wandb (a table). Only at layouts where rank 0 holds
    # the whole model (tp=1, pp=1, ZeRO < 3); elsewhere one line at the start says they are skipped
    # (sample a saved checkpoint with trainer.generate). Prompt plus sample_tokens must fit model.seq_len.
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32


@dataclass
class WandbConfig:
    # auto (online if WANDB_API_KEY is set, else offline) | online (offline without a key) | offline | disabled
    mode: str = "auto"
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
class SpeedConfig:
    """Speed options: kernels and DeepSpeed settings that change how fast a step runs, not what it computes
    (beyond the precision's rounding). "auto" is what a GPU run wants and leaves CPU runs as they were."""

    # torch's fused AdamW kernel (one launch for every parameter): auto = fused on CUDA, torch's foreach
    # AdamW on CPU (the parity tests' reference); true runs torch's fused CPU kernel too.
    fused_adamw: str = "auto"  # auto | true | false
    # ZeRO >= 1: reduce gradient buckets on a side stream while backward continues. auto = on for CUDA (what
    # DeepSpeed users run), off on CPU (gloo has no streams to overlap on, and the planner assumes off).
    overlap_comm: str = "auto"  # auto | true | false
    # ZeRO >= 1: copy gradients into one contiguous buffer as they are reduced (DeepSpeed's default, fewer
    # fragments); false saves that buffer's copy.
    contiguous_gradients: bool = True
    # Mixed precision at ZeRO-0 with one data-parallel rank and no pipeline: step through DeepSpeed's ZeRO-1
    # optimizer, whose fp32 masters, gradient copies, overflow check and norm are flat buffers (one kernel
    # each), not its per-tensor FP16_UnfusedOptimizer. One rank's ZeRO-1 partitions nothing: the same states,
    # numerics and checkpoints. Off by default: on one H200 (gpt3-1.3b, bf16) it ran 0.81x the per-tensor
    # wrapper, whose per-tensor overflow syncs trainer.runtime.compat batches into one (docs/gpu.md).
    # auto = on for CUDA.
    flat_optimizer: str = "false"  # auto | true | false
    # torch.compile each transformer block (inductor; the first steps pay the compilation, tens of seconds).
    compile: bool = False
    # The output head and the cross entropy in one pass over chunks of tokens (trainer.model.fused_loss): the
    # same loss and gradients without the whole (tokens, V/tp) fp32 logits and their gradient (2 x 0.8 GB
    # for gpt3-1.3b at micro-batch 2 x 2048; 2 x 2.1 GB with Llama 3's vocabulary). Every layout.
    fused_loss: bool = False
    # Attention through scaled_dot_product_attention's flash kernel: auto = required on CUDA with bf16/fp16
    # (checked once at start, one line if this GPU or shape cannot run it), nothing on CPU or fp32; false lets
    # torch choose a kernel per call.
    flash_attention: str = "auto"  # auto | false
    # Any other DeepSpeed setting, deep-merged into the generated config (ds_config.json), e.g.
    # {zero_optimization: {offload_optimizer: {device: cpu}}}. Keys the trainer sets from its own keys are
    # refused naming that key; unknown top-level keys are refused.
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)


MIXED_PRECISIONS = ("bf16", "fp16")  # 16-bit weights with fp32 masters (DeepSpeed bf16 / fp16 with loss scaling)
PRECISIONS = ("fp32", *MIXED_PRECISIONS)
HOST_HEAPS = ("auto", "lean", "glibc")
ZERO_STAGES = (0, 1, 2, 3)
DP_SYNCS = ("allreduce", "parameter_server", "local_sgd")
OUTER_OPTIMIZERS = ("none", "nesterov")
OBJECTIVES = ("throughput", "memory")
SWITCHES = ("auto", "true", "false")  # speed.* keys that default to what the device wants


def lean_heap(host_heap: str, on_cpu: bool, zero_stage: int) -> bool:
    """Whether a rank's C heap is lean (``train.host_heap``): ``auto`` makes it lean for CPU ranks at
    ZeRO-3, the stage chosen to save memory. The trainer pins it; the planner then counts no allocator slack."""
    if host_heap == "auto":
        return on_cpu and zero_stage == 3
    return host_heap == "lean"


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes derived from the config and the world size, solved in one place."""

    dp: int  # data-parallel degree
    micro_batch: int  # samples per rank per micro-step
    grad_accum: int  # micro-steps per optimizer step
    global_batch: int  # micro_batch * grad_accum * dp
    tokens_per_step: int
