"""The comparison's data-parallel synchronisation rows (``parallel.dp_sync``): for every layout that keeps whole
replicas (ZeRO 0, no pipeline, dp > 1), the bytes a rank sends per step and the most any one link carries,
measured beside ``trainer.analysis.formulas.dp_sync_traffic``, and the predicted time of that traffic on the
planner's cluster descriptions (``conf/cluster``).

Bytes are means over the measured steps, not medians: local SGD moves nothing on most steps and everything on
its sync steps (every H-th and the last), so its prediction is the share of the measured steps that synced.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from trainer.analysis.formulas import SyncTraffic, dp_sync_traffic, is_sync_step, link_bytes

MB = 2**20  # the comparison's MB (results, report)
# (label, cluster option, link): inside one node, and one rank per node, where DiLoCo-style training lives.
CLUSTER_LINKS = (
    ("A100 NVLink", "a100-80gb", "intra"),
    ("A100 IB 1 rank/node", "a100-80gb", "inter"),
    ("H100 IB 1 rank/node", "h100-sxm", "inter"),
)


@dataclass
class SyncResult:
    scheme: str  # allreduce | parameter_server | local_sgd H=16 | DiLoCo H=16
    rank_bytes: float  # measured: what a worker sends per step (the least any rank sends)
    busiest_link_bytes: float  # measured: the most one rank's link carries in one direction per step
    predicted_rank_bytes: float
    predicted_busiest_link_bytes: float
    predicted_seconds: dict[str, float]  # per CLUSTER_LINKS label: the busiest link's time per step


def scheme_label(layout) -> str:
    if layout.dp_sync != "local_sgd":
        return layout.dp_sync
    name = "DiLoCo" if layout.outer_optimizer == "nesterov" else "local_sgd"
    return f"{name} H={layout.sync_interval}"


def link_bytes_of(rank_entry: dict, dp: int) -> tuple[float, float]:
    """(sent, received) bytes of one rank's data-parallel synchronisation in one step (a metrics.jsonl rank
    entry): DeepSpeed's collectives over groups of ``dp`` ranks -- its gradient all-reduce and, with clipping,
    the 4-byte mean of the ranks' gradient norms -- and parallel.dp_sync's own messages."""
    ds = [(*k.partition("@")[::2], v["bytes"]) for k, v in rank_entry.get("ds_comm", {}).items()]
    kinds = [(kind, full) for kind, group, full in ds if group == str(dp)]
    kinds += [(kind, v["bytes"]) for kind, v in rank_entry.get("dp_comm", {}).items()]
    pairs = [link_bytes(kind, full, dp) for kind, full in kinds]
    return sum(sent for sent, _ in pairs), sum(received for _, received in pairs)


def measured_sync(steps: list[dict], dp: int) -> tuple[float, float]:
    """(a worker's bytes sent, the busiest link's bytes) per step, means over ``steps``."""
    links = [[link_bytes_of(rank, dp) for rank in step["ranks"]] for step in steps]
    worker = statistics.mean(min(sent for sent, _ in ranks) for ranks in links)
    busiest = statistics.mean(max(max(link) for link in ranks) for ranks in links)
    return worker, busiest


def _traffic(layout, steps: list[dict], total_steps: int, psi: float) -> tuple[SyncTraffic, float]:
    """The scheme's predicted traffic over these logged steps of a run of ``total_steps``, and the share of
    them that synchronised (local SGD: those that averaged; 1 for the others)."""
    interval = layout.sync_interval if layout.dp_sync == "local_sgd" else 1
    share = statistics.mean(is_sync_step(s["step"], interval, total_steps) for s in steps)
    return dp_sync_traffic(layout.dp_sync, 4 * psi, layout.dp, share), share  # fp32 gradients or parameters


def rank_sync_bytes(layout, steps: list[dict], total_steps: int, psi: float, dp_rank: int) -> float:
    """Predicted bytes data-parallel rank ``dp_rank`` sends per step: the server's link is the busiest."""
    traffic, _ = _traffic(layout, steps, total_steps, psi)
    return traffic.busiest_link if dp_rank == 0 else traffic.rank


def sync_result(layout, steps: list[dict], total_steps: int, psi: float) -> SyncResult | None:
    """The row of a layout whose replicas are whole, from its measured steps; None for the others."""
    if layout.zero or layout.pp > 1 or layout.dp <= 1:
        return None
    traffic, share = _traffic(layout, steps, total_steps, psi)
    rank, busiest = measured_sync(steps, layout.dp)
    seconds = {label: traffic_seconds(layout, psi, share, link) for label, link in cluster_links().items()}
    return SyncResult(scheme_label(layout), rank, busiest, traffic.rank, traffic.busiest_link, seconds)


def traffic_seconds(layout, psi: float, share: float, link) -> float:
    from trainer.analysis.planner.costmodel import dp_sync_time

    return dp_sync_time(layout.dp_sync, 4 * psi, layout.dp, share, link)


def cluster_links() -> dict:
    """CLUSTER_LINKS' links, from the cluster descriptions the planner reads."""
    import yaml

    from trainer.analysis.planner.cluster import cluster_spec
    from trainer.analysis.planner.config import ClusterConfig

    conf = Path(__file__).resolve().parents[3] / "conf" / "cluster"
    specs = {
        name: cluster_spec(ClusterConfig(**yaml.safe_load((conf / f"{name}.yaml").read_text())))
        for _, name, _ in CLUSTER_LINKS
    }
    return {label: getattr(specs[name], which) for label, name, which in CLUSTER_LINKS}


def sync_table(results) -> list[str]:
    """The markdown table of the layouts that have a SyncResult (``LayoutResult.sync``)."""
    rows = [r for r in results if r.status == "ok" and r.sync is not None]
    if not rows:
        return []
    labels = [label for label, _, _ in CLUSTER_LINKS]
    lines = [
        "## Data-parallel synchronisation",
        "",
        "Bytes per optimizer step (mean over the measured steps), measured / predicted "
        "(`formulas.dp_sync_traffic`); predicted milliseconds per step of the busiest link on the planner's clusters "
        "(`costmodel.dp_sync_time`); "
        "the loss after the same tokens.",
        "",
        "| layout | scheme | step s | MB/step a rank sends | MB/step busiest link | "
        + " | ".join(f"ms/step {label}" for label in labels)
        + " | final loss | val loss |",
        "|" + "---|" * (7 + len(labels)),
    ]
    for r in rows:
        s = r.sync
        times = " | ".join(f"{s.predicted_seconds[label] * 1e3:.3f}" for label in labels)
        lines.append(
            f"| {r.name} | {s.scheme} | {r.step_time_s:.3f} | {s.rank_bytes / MB:.3f} / "
            f"{s.predicted_rank_bytes / MB:.3f} | {s.busiest_link_bytes / MB:.3f} / "
            f"{s.predicted_busiest_link_bytes / MB:.3f} | {times} | "
            f"{r.final_loss:.4f} | {r.val_loss:.4f} |"
        )
    return [*lines, ""]
