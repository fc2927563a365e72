"""The planner's typed config (``conf/plan.yaml``) and its validation.

The model group is the trainer's own (``conf/model``); the cluster group (``conf/cluster``) is new.
The global batch lives where the trainer keeps it, ``parallel.global_batch``; ``train.global_batch``
is accepted as an alias because the issue spells it so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from trainer.analysis.planner.layouts import PIN_KEYS
from trainer.analysis.planner.stages import ATTENTIONS, ENGINES
from trainer.config.schema import PRECISIONS as TRAINER_PRECISIONS
from trainer.config.schema import ZERO_STAGES, ConfigError, ModelConfig, ParallelConfig
from trainer.config.validate import _validate_architecture
from trainer.model.shape import PIPELINE_PARTITIONS, RECOMPUTE

PRECISIONS = ("auto", *TRAINER_PRECISIONS)  # auto: the cluster's default_precision


@dataclass
class ClusterConfig:
    name: str = MISSING
    gpu: str = ""  # what one device is, for the report
    nodes: int = 1  # whole nodes; the plan uses all nodes * gpus_per_node devices
    gpus_per_node: int = 8  # devices (ranks) per node; cpu-local: 0 = one per physical core
    mem_per_gpu_gb: float = 0.0  # device memory visible to the framework, GB (1e9 bytes); cpu-local: measured
    peak_tflops_bf16: float = 0.0  # dense peak per device, TFLOP/s (data sheet); 0 = not supported
    peak_tflops_fp16: float = 0.0
    peak_tflops_fp32: float = 0.0
    mem_bw_gbs: float = 0.0  # device memory bandwidth, GB/s: the optimizer step is bound by it
    intra_node_bw_gbs: float = 0.0  # per device, one direction, GB/s (NVLink: half the bidirectional figure)
    intra_node_latency_us: float = 5.0  # per ring step
    inter_node_bw_gbs: float = 0.0  # per device, one direction, GB/s (node NIC bandwidth / devices per node)
    inter_node_latency_us: float = 10.0  # per ring step
    # Fixed cost of one collective call beyond its ring steps (launch, and on an oversubscribed CPU the
    # scheduler waking every peer); 0 on GPUs, where NCCL's per-step latency covers it. plan.calibrate fits it.
    call_latency_us: float = 0.0
    cpu_cores: int = 0  # physical cores of a shared (CPU) machine; measured on cpu-local; 0 = unknown
    # Achieved / peak FLOP/s of a transformer layer's work (matmuls plus the memory-bound ops around
    # them); plan.calibrate fits it on the machine at hand.
    compute_efficiency: float = 0.5
    # Predicted / achieved time of a 1F1B slot in DeepSpeed's PipelineEngine (engine deepspeed, pp > 1), which runs
    # the same work slower than Megatron-LM 2021's engine, whose slots the model meets (Table 2; engine megatron
    # ignores this key). docs/planner.md, "DeepSpeed's engine": fitted on MT-NLG, checked on BLOOM. cpu-local: 1.0
    # (its pipeline costs are calibrated as they are).
    pipeline_efficiency: float = 1.0
    comm_efficiency: float = 0.8  # achieved / link bandwidth of ring collectives and p2p sends
    reserved_gb: float = 2.0  # per device and outside the model: CUDA context, NCCL buffers, workspaces
    fragmentation: float = 0.10  # allocator slack, as a fraction of what the model allocates
    # Temporaries the backend's all-gather / reduce-scatter keep resident, per byte of the gathered output /
    # scattered input: 0 for NCCL (it works in the caller's buffers); cpu-local: measured (gloo copies).
    gather_overhead: float = 0.0
    scatter_overhead: float = 0.0
    shared: bool = False  # ranks of a node share one device's compute and memory (CPU processes)
    measure: bool = False  # fill the hardware numbers by measuring this machine (cpu-local)
    default_precision: str = "bf16"  # what parallel.precision=auto means on this cluster
    # Whose training engine the predictions are for: deepspeed (this trainer: DeepSpeed's pipeline partitioner
    # and its gradient reductions in the model's dtype) or megatron (Megatron-LM 2021: even stages, fp32
    # reductions; what the published A100 runs ran). docs/planner.md: what differs, what is measured.
    engine: str = "deepspeed"
    # The data-parallel gradient reduction runs during the last micro-batch's backward and costs only what
    # outlasts it (Megatron-LM's --DDP-impl torch, as its 2021 paper ran Table 1's pp = 1 rows); false: after
    # backward (Megatron-LM's local DDP; this trainer's DeepSpeed engine as the planner predicts it).
    overlap_grad_reduce: bool = False
    # How attention is computed (``stages.ATTENTIONS``): auto = the engine's (deepspeed: this trainer's fused
    # kernels, no s×s scores in memory; megatron: scores written and kept); materialized / fused to predict a run
    # whose attention differs from its engine's, e.g. a DeepSpeed-engine run from before flash attention.
    attention: str = "auto"


@dataclass
class PlanParallel:
    global_batch: int | None = None  # samples per optimizer step (the trainer's key); default 8
    precision: str = "auto"  # auto (the cluster's default) | fp32 | bf16 | fp16
    pipeline_partition: str = "parameters"  # the trainer's key: how DeepSpeed cuts stages (parameters | uniform)
    # Megatron-LM's interleaved schedule (cluster.engine=megatron): model chunks per pipeline stage for every
    # pipelined layout that can run it; 1 = plain 1F1B (DeepSpeed's engine, the trainer's, has nothing else)
    virtual_stages: int = 1
    # Pinned degrees (the trainer's keys; unset = any): the plan also ranks the layouts that have them against
    # the best of all, e.g. a run you have, or a published one (PIN_KEYS)
    tp: int | None = None
    pp: int | None = None
    zero_stage: int | None = None
    micro_batch: int | None = None
    recompute: str | None = None
    sequence_parallel: bool | None = None


@dataclass
class PlanTrain:
    global_batch: int | None = None  # alias of parallel.global_batch (the spelling)


@dataclass
class PlanOptions:
    top: int = 10  # rows of the table
    out: str = ""  # write every enumerated layout to this JSON file
    calibrate: str = ""  # a trainer.compare report directory: fit efficiencies to its results.csv
    rejected: int = 24  # (tp, pp) lines of rejected families to print


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: PlanParallel = field(default_factory=PlanParallel)
    train: PlanTrain = field(default_factory=PlanTrain)
    plan: PlanOptions = field(default_factory=PlanOptions)


def global_batch(cfg: PlanConfig) -> int:
    """The global batch from either key (they must agree when both are given); the trainer's default otherwise."""
    canonical, alias = cfg.parallel.global_batch, cfg.train.global_batch
    if canonical is not None and alias is not None and canonical != alias:
        raise ConfigError(
            "train.global_batch", alias, f"conflicts with parallel.global_batch={canonical}; give only one of them"
        )
    chosen = canonical if canonical is not None else alias
    return ParallelConfig().global_batch if chosen is None else chosen


def precision(cfg: PlanConfig) -> str:
    return cfg.cluster.default_precision if cfg.parallel.precision == "auto" else cfg.parallel.precision


def pins(cfg: PlanConfig) -> dict:
    """The layout degrees the command line pinned, by Layout's names."""
    return {key: value for key in PIN_KEYS if (value := getattr(cfg.parallel, key)) is not None}


def validate_pins(given: dict) -> None:
    for key in ("tp", "pp", "micro_batch"):
        if given.get(key, 1) < 1:
            raise ConfigError(f"parallel.{key}", given[key], "must be >= 1 (or leave it out: any)")
    if given.get("zero_stage", 0) not in ZERO_STAGES:
        raise ConfigError("parallel.zero_stage", given["zero_stage"], "must be 0, 1, 2 or 3 (or leave it out: any)")
    if given.get("recompute", "none") not in RECOMPUTE:
        raise ConfigError("parallel.recompute", given["recompute"], f"must be one of {', '.join(RECOMPUTE)}")


def validate_cluster(c: ClusterConfig) -> None:
    if c.nodes < 1:
        raise ConfigError("cluster.nodes", c.nodes, "must be >= 1 (whole nodes), e.g. cluster.nodes=16")
    if c.engine not in ENGINES:
        raise ConfigError("cluster.engine", c.engine, f"must be one of {', '.join(ENGINES)}")
    if c.attention not in ATTENTIONS:
        raise ConfigError("cluster.attention", c.attention, f"must be one of {', '.join(ATTENTIONS)}")
    if c.gpus_per_node < (0 if c.measure else 1):
        raise ConfigError("cluster.gpus_per_node", c.gpus_per_node, "must be >= 1")
    if c.measure:
        return  # the hardware numbers come from measuring this machine
    for key in ("mem_per_gpu_gb", "mem_bw_gbs", "intra_node_bw_gbs", "inter_node_bw_gbs"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"cluster.{key}", getattr(c, key), "must be > 0")
    for key in (
        "intra_node_latency_us",
        "inter_node_latency_us",
        "call_latency_us",
        "reserved_gb",
        "fragmentation",
        "gather_overhead",
        "scatter_overhead",
    ):
        if getattr(c, key) < 0:
            raise ConfigError(f"cluster.{key}", getattr(c, key), "must be >= 0")
    for key in ("compute_efficiency", "comm_efficiency", "pipeline_efficiency"):
        if not 0 < getattr(c, key) <= 1:
            raise ConfigError(f"cluster.{key}", getattr(c, key), "must be in (0, 1]")


def validate_plan(cfg: PlanConfig) -> None:
    """Everything checkable without measuring or enumerating; the batch is checked against the layouts."""
    m = cfg.model
    for key in ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size", "make_vocab_size_divisible_by"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}", getattr(m, key), "must be > 0")
    if m.n_embd % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    _validate_architecture(m)  # the trainer's own check of n_kv_head, ffn_hidden, mlp, norm, position
    validate_cluster(cfg.cluster)
    if cfg.parallel.precision not in PRECISIONS:
        raise ConfigError("parallel.precision", cfg.parallel.precision, f"must be one of {', '.join(PRECISIONS)}")
    chosen = precision(cfg)
    if not cfg.cluster.measure and getattr(cfg.cluster, f"peak_tflops_{chosen}", 0) <= 0:
        raise ConfigError("parallel.precision", chosen, f"cluster {cfg.cluster.name} has no {chosen} peak; use bf16")
    if chosen == "fp16" and cfg.cluster.measure:
        raise ConfigError("parallel.precision", chosen, "fp16 needs a GPU; use bf16 or fp32 on cpu-local")
    if cfg.parallel.pipeline_partition not in PIPELINE_PARTITIONS:
        choices = ", ".join(PIPELINE_PARTITIONS)
        raise ConfigError("parallel.pipeline_partition", cfg.parallel.pipeline_partition, f"must be one of {choices}")
    if global_batch(cfg) < 1:
        raise ConfigError("parallel.global_batch", global_batch(cfg), "must be >= 1")
    validate_pins(pins(cfg))
    if cfg.parallel.virtual_stages < 1:
        raise ConfigError("parallel.virtual_stages", cfg.parallel.virtual_stages, "must be >= 1 (1: no interleaving)")
    if cfg.parallel.virtual_stages > 1 and cfg.cluster.engine != "megatron":
        fix = "DeepSpeed's pipeline engine has no interleaved schedule; add cluster.engine=megatron or drop it"
        raise ConfigError("parallel.virtual_stages", cfg.parallel.virtual_stages, fix)
    if cfg.plan.top < 1:
        raise ConfigError("plan.top", cfg.plan.top, "must be >= 1")
