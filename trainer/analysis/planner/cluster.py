"""Hardware numbers of one cluster in SI units, and which link each kind of traffic crosses.

Ranks are ordered as in the trainer (tp fastest, then dp, then pp), so a tensor-parallel group is
``tp`` adjacent ranks inside one node, a data-parallel group strides by ``tp``, and pipeline stages
are ``tp·dp`` ranks apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.analysis.planner.config import ClusterConfig
from trainer.analysis.planner.memory import Collectives
from trainer.analysis.planner.stages import keeps_attention_scores

GB = 1e9


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per rank, one direction, after comm_efficiency
    latency: float  # seconds per ring step


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    gpu: str
    nodes: int
    gpus_per_node: int
    mem_bytes: float  # per rank
    peak_flops: dict[str, float]  # per rank, by precision
    mem_bw: float  # bytes/s per rank
    intra: Link
    inter: Link
    compute_efficiency: float
    reserved_bytes: float
    fragmentation: float
    measured: tuple[str, ...] = ()  # lines saying what was measured on this machine (cpu-local)
    call_latency: float = 0.0  # seconds per collective call beyond its ring steps
    # Ranks time-share one pool of cores (cpu-local): a rank's idle time (a pipeline bubble) goes to the
    # others, and one rank alone can run ``rank_cap`` times its fair share (its threads / the cores it
    # shares: the trainer gives each of r ranks max(1, cores // r) threads). 1.0 and False on GPUs.
    pooled: bool = False
    rank_cap: float = 1.0
    collectives: Collectives = Collectives()  # the backend's collective temporaries (memory)
    cpu: bool = False  # the ranks are CPU processes (their memory is the C heap's)
    engine: str = "deepspeed"  # whose costs are predicted: this trainer's (DeepSpeed) or Megatron-LM 2021's
    pipeline_efficiency: float = 1.0  # the engine's 1F1B slot: predicted / achieved time (ClusterConfig's)
    overlap_grad_reduce: bool = False  # the gradient reduction hides behind the last backward (ClusterConfig's)
    attention: str = "auto"  # how attention is computed (ClusterConfig's)

    @property
    def keeps_scores(self) -> bool:
        """Attention writes the s×s scores to memory and keeps them for backward (``stages.keeps_attention_scores``)."""
        return keeps_attention_scores(self.engine, self.attention)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def rank_peak(self, precision: str) -> float:
        return self.peak_flops.get(precision, 0.0)

    def dp_link(self, tp: int, dp: int) -> Link:
        """A dp group holds ``gpus_per_node / tp`` ranks per node. Inside one node it rides NVLink;
        across nodes every member of the node sends through its own NIC (NCCL puts one ring per NIC),
        so the ring runs at the members' summed NIC bandwidth, capped by NVLink."""
        per_node = max(1, self.gpus_per_node // tp)
        if dp <= per_node or self.nodes == 1:
            return self.intra
        return Link(min(self.intra.bandwidth, per_node * self.inter.bandwidth), self.inter.latency)

    def tp_link(self, tp: int) -> Link:
        """NVLink inside a node; a tp group larger than a node rings through the nodes' NICs, one per rank (the
        planner enumerates no such layout; the paper's sweeps measured some)."""
        return self.intra if tp <= self.gpus_per_node or self.nodes == 1 else self.inter

    def pp_link(self) -> Link:
        """Some stage boundary crosses nodes whenever there is more than one node, and the pipeline
        runs at its slowest boundary."""
        return self.inter if self.nodes > 1 else self.intra

    def with_efficiency(self, compute: float, comm_scale: float, call_latency: float | None = None) -> ClusterSpec:
        """The same cluster with another compute efficiency, link bandwidths scaled by ``comm_scale`` and,
        when given, another per-call collective latency."""
        scale = lambda link: Link(link.bandwidth * comm_scale, link.latency / comm_scale)  # noqa: E731
        call = self.call_latency if call_latency is None else call_latency
        return replace(
            self, compute_efficiency=compute, intra=scale(self.intra), inter=scale(self.inter), call_latency=call
        )


def rank_cap(ranks: int, cores: int) -> float:
    """How many fair shares (1/ranks of the machine) one of ``ranks`` time-sharing ranks can use when the
    others wait: its threads, max(1, cores // ranks) as the trainer sets them, over the cores. 1 when
    every rank has cores of its own (ranks <= cores) or the cores are unknown."""
    if cores <= 0 or ranks <= cores:
        return 1.0
    return max(1.0, ranks * min(max(1, cores // ranks), cores) / cores)


def local_ranks(c: ClusterConfig) -> int:
    """Ranks per node; cpu-local's 0 means one per physical core (cheap: no measurement)."""
    if c.gpus_per_node > 0:
        return c.gpus_per_node
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def resolve(c: ClusterConfig) -> tuple[ClusterConfig, tuple[str, ...]]:
    """``c`` with every hardware number filled in (``measure: true`` measures this machine, once), and
    lines saying what was measured."""
    if not c.measure:
        return c, ()
    from trainer.analysis.planner.localbench import measured_cluster

    measured, notes = measured_cluster(c, local_ranks(c))
    return replace(measured, measure=False), notes


def cluster_spec(c: ClusterConfig, notes: tuple[str, ...] = ()) -> ClusterSpec:
    """The config's numbers in SI units per rank (measuring first where the config asks for it)."""
    if c.measure:
        c, notes = resolve(c)
    share = local_ranks(c) if c.shared else 1  # CPU ranks split one machine's cores and memory
    peaks = {p: getattr(c, f"peak_tflops_{p}") * 1e12 / share for p in ("bf16", "fp16", "fp32")}
    return ClusterSpec(
        name=c.name,
        gpu=c.gpu,
        nodes=c.nodes,
        gpus_per_node=local_ranks(c),
        mem_bytes=c.mem_per_gpu_gb * GB / share,
        peak_flops={p: v for p, v in peaks.items() if v > 0},
        mem_bw=c.mem_bw_gbs * GB / share,
        intra=Link(c.intra_node_bw_gbs * GB * c.comm_efficiency, c.intra_node_latency_us * 1e-6),
        inter=Link(c.inter_node_bw_gbs * GB * c.comm_efficiency, c.inter_node_latency_us * 1e-6),
        compute_efficiency=c.compute_efficiency,
        reserved_bytes=c.reserved_gb * GB,
        fragmentation=c.fragmentation,
        measured=notes,
        call_latency=c.call_latency_us * 1e-6,
        pooled=c.shared,
        rank_cap=rank_cap(share, c.cpu_cores) if c.shared else 1.0,
        collectives=Collectives(c.gather_overhead, c.scatter_overhead),
        cpu=c.gpu.lower().startswith("cpu"),
        engine=c.engine,
        # Megatron-LM 2021's engine runs the modelled slots as modelled (its Table 2 is met): 1 by construction
        pipeline_efficiency=c.pipeline_efficiency if c.engine == "deepspeed" else 1.0,
        overlap_grad_reduce=c.overlap_grad_reduce,
        attention=c.attention,
    )


def spec_for_world(c: ClusterConfig, world: int, notes: tuple[str, ...] = ()) -> ClusterSpec:
    """The resolved cluster cut to ``world`` ranks (a calibration run's size): whole nodes, or part of one."""
    if world <= c.gpus_per_node or c.shared:
        return cluster_spec(replace(c, nodes=1, gpus_per_node=world if c.shared else c.gpus_per_node), notes)
    return cluster_spec(replace(c, nodes=-(-world // c.gpus_per_node)), notes)
