"""DeepSpeed's collectives of a measured step, from its own communication logger, with the group size
each ran over (so bytes turn into bytes sent on a ring)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.analysis.formulas import wire_bytes
from trainer.runtime.compat import name_comm_logs

# DeepSpeed's op names -> the kinds the analytic model counts. The message size its logger records is
# the op's ``tensor`` argument: the input, which for an all-gather is this rank's shard.
_DS_KINDS = {
    "all_reduce": "all_reduce",
    "inference_all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "allgather_fn": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_fn": "reduce_scatter",
    "reduce": "reduce",
    "broadcast": "broadcast",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
}
_GATHERS = {"all_gather"}  # logged per shard; the full buffer is n times that


@dataclass
class CommTotal:
    """One kind of collective over groups of one size, summed over a step."""

    count: int = 0
    bytes: int = 0  # full buffers (nccl-tests' "size"), like trainer.parallel.mappings.CommRecord
    wire_bytes: float = 0.0  # what this rank sends on a ring (trainer.analysis.formulas.wire_bytes)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"count": self.count, "bytes": self.bytes, "wire_bytes": self.wire_bytes, "seconds": self.seconds}


class DeepSpeedComms:
    """DeepSpeed's communication logger (``deepspeed.comm.comms_logger``), switched on for measured
    steps only: every collective DeepSpeed issues (gradient reduction, ZeRO gathers and partitions,
    pipeline sends and receives) with its message size and time. The tensor-parallel layers and the
    loop's own reductions call torch.distributed directly and are counted by ``CommStats`` instead.

    The logger keys its records by op name, not by group, but converting bytes moved needs the group
    size: ``__init__`` has the records named with "@<group size>" appended (``name_comm_logs`` in
    trainer.runtime.compat); ``close`` puts DeepSpeed's naming back.
    """

    def __init__(self):
        import deepspeed.comm as ds_comm
        import deepspeed.comm.comm as ds_comm_impl

        self._comm = ds_comm
        self.logger = ds_comm_impl.comms_logger
        self.close = name_comm_logs(_name_with_group_size)
        self._world = ds_comm.get_world_size() if ds_comm.is_initialized() else 1

    def start(self) -> None:
        self.logger.reset_data()
        self._comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)

    def stop(self) -> dict[str, CommTotal]:
        self._comm.configure(enabled=False)
        return self.totals()

    def seconds(self) -> float:
        """Seconds spent in logged ops since ``start`` (a running total, for the phase clock)."""
        return sum(sum(v[1]) for sizes in self.logger.comms_dict.values() for v in sizes.values()) / 1e3

    def totals(self) -> dict[str, CommTotal]:
        """ "<kind>@<group size>" -> totals since ``start``."""
        out: dict[str, CommTotal] = {}
        for name, sizes in self.logger.get_raw_data().items():
            op, _, group = name.partition("@")
            kind = _DS_KINDS.get(op.strip(), op.strip())
            n = int(group) if group.isdigit() else self._world
            total = out.setdefault(f"{kind}@{n}", CommTotal())
            for msg_bytes, (count, latencies_ms, *_rest) in sizes.items():
                full = msg_bytes * (n if kind in _GATHERS else 1)
                total.count += count
                total.bytes += count * full
                total.wire_bytes += count * _wire(kind, full, n)
                total.seconds += sum(latencies_ms) / 1e3
        return out


def _wire(kind: str, full: float, n: int) -> float:
    try:
        return wire_bytes(kind, full, n)
    except ValueError:  # barriers and other ops without a payload model
        return 0.0


def _name_with_group_size(func_args: dict, debug: bool) -> str:
    """The log name DeepSpeed would use plus "@<ranks in the op's group>" (2 for point-to-point).

    ``timed_op`` calls this once before the op (timer not started) and once after. Before, we also
    empty the op's timer: DeepSpeed reads it with ``elapsed(reset=False)``, which returns the sum over
    every call so far under that name, so without this each recorded latency would be cumulative.
    """
    import deepspeed.comm.comm as ds_comm_impl

    name = func_args["log_name"]
    if "group" not in func_args or _DS_KINDS.get(name) in ("send", "recv"):
        name = f"{name}@2"
    else:
        try:
            name = f"{name}@{ds_comm_impl.get_world_size(group=func_args['group'])}"
        except Exception:  # a group this backend cannot size: keep the plain name
            pass
    timer = ds_comm_impl.timers(name)
    if not timer.started_:
        timer.reset()
    return name
