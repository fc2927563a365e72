"""Where measurements go -- metrics.jsonl in the run directory, wandb, the console (rank 0 only) -- and
the instruments a measured step reads: phase clock, DeepSpeed's communication log, tensor memory by
kind, saved activations.

Instruments cost time (device syncs, object walks, Python hooks), so the loop runs them only on the
steps it logs; every other step runs bare.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.analysis.formulas import wire_bytes


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.enabled = enabled
        self.wandb_run = wandb_run
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1) if enabled else None
        self._t0 = time.time()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time_s": round(time.time() - self._t0, 3)}
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(_for_wandb(record), step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _for_wandb(record: dict[str, Any]) -> dict[str, Any]:
    """wandb charts nested dicts as namespaced keys but not lists of dicts: key each rank by name."""
    out = {k: v for k, v in record.items() if k not in ("step", "ranks")}
    for entry in record.get("ranks", []):
        out[f"rank{entry['rank']}"] = {k: v for k, v in entry.items() if k != "rank"}
    return out


class Console:
    """Rank 0's view of training: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, total_steps: int, progress: bool):
        self.enabled = enabled
        self._bar = None
        if enabled and progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            print(line, flush=True)

    def advance(self, step: int, status: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- time -----------------------------------------------------------------------------------------


class PhaseClock:
    """Wall seconds per phase of one step (data, forward, backward, optimizer, ...) and the
    communication seconds inside each phase, read from ``comm_seconds`` (a running total).

    Off (the default) it costs one attribute test per phase. On, it waits for the device at every
    phase boundary, so the times are the device's, not kernel launches'.
    """

    def __init__(self, device: torch.device, comm_seconds: Callable[[], float]):
        self.sync = device.type == "cuda"
        self.comm_seconds = comm_seconds
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.comm: dict[str, float] = defaultdict(float)

    def start(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds.clear()
        self.comm.clear()

    def phase(self, name: str):
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start, comm0 = time.perf_counter(), self.comm_seconds()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.comm[name] += self.comm_seconds() - comm0

    def breakdown(self, step_s: float, compute: tuple[str, ...] = ("forward", "backward", "optimizer")) -> dict:
        """Seconds of the step by where they went. Compute phases exclude the communication inside
        them; ``comm_s`` is all time inside collectives (including waiting for peers) plus phases that
        are communication as a whole (a pipeline's sends and receives); ``other_s`` is the rest."""
        out = {"data_s": self.seconds.get("data", 0.0)}
        for name in compute:
            out[f"{name}_s"] = self.seconds.get(name, 0.0) - self.comm.get(name, 0.0)
        comm_phases = [n for n in self.seconds if n not in compute and n != "data"]
        out["comm_s"] = sum(self.comm.get(n, 0.0) for n in compute) + sum(self.seconds[n] for n in comm_phases)
        out["other_s"] = max(step_s - sum(out.values()), 0.0)
        return {k: round(v, 6) for k, v in out.items()}


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used, all threads."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


# --- communication ----------------------------------------------------------------------------

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
    size: ``__init__`` replaces the name function ``timed_op`` calls (deepspeed.comm.comm's
    ``get_debug_log_name``, DeepSpeed 0.19) with one that appends "@<group size>". Where that function
    is missing the records keep their plain names and the group is taken as the whole world.
    """

    def __init__(self):
        import deepspeed.comm as ds_comm
        import deepspeed.comm.comm as ds_comm_impl

        self._comm = ds_comm
        self.logger = ds_comm_impl.comms_logger
        if hasattr(ds_comm_impl, "get_debug_log_name"):
            ds_comm_impl.get_debug_log_name = _name_with_group_size
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


# --- memory -------------------------------------------------------------------------------------

KINDS = ("params", "grads", "master", "optimizer", "buffers", "other")


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the memory a tensor keeps alive; None for empty or meta tensors."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def inner_optimizer(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer holding the Adam states, under DeepSpeed's ZeRO / precision wrappers."""
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class TensorCensus:
    """Bytes of the tensors a training engine keeps, by kind, each storage counted once:

        params     the model's parameters (a ZeRO-3 rank's partition, ``ds_tensor``)
        grads      ``.grad`` of parameters and master copies, and the ZeRO optimizer's gradient buffers
        master     fp32 copies the optimizer steps when they are not the parameters (ZeRO keeps them)
        optimizer  the optimizer's state (Adam's exp_avg, exp_avg_sq, step)
        buffers    communication buckets (ZeRO's ``ipg`` reduce buckets)
        other      any other tensor the ZeRO optimizer holds

    Kinds are assigned in that order of precedence, so a gradient that is a view into a bucket
    counts as the bucket. ``sample`` keeps each kind's high-water mark over a step: gradients are
    biggest before the optimizer step, optimizer states after the first one.
    """

    def __init__(self, module: nn.Module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.inner = inner_optimizer(optimizer)
        self.peak: dict[str, int] = dict.fromkeys(KINDS, 0)

    def reset(self) -> None:
        self.peak = dict.fromkeys(KINDS, 0)

    def sample(self) -> None:
        for kind, nbytes in self.count().items():
            self.peak[kind] = max(self.peak[kind], nbytes)

    def count(self) -> dict[str, int]:
        seen: set[int] = set()
        out = dict.fromkeys(KINDS, 0)

        def add(kind: str, t) -> None:
            found = _storage(t) if isinstance(t, torch.Tensor) else None
            if found is not None and found[0] not in seen:
                seen.add(found[0])
                out[kind] += found[1]

        params = list(self.module.parameters())
        for p in params:
            add("params", p.data)
            add("params", getattr(p, "ds_tensor", None))
        masters = [p for g in (self.inner.param_groups if self.inner else []) for p in g["params"]]
        for p in masters:
            add("master", p)
        for state in self.inner.state.values() if self.inner else []:
            for value in state.values():
                add("optimizer", value)
        if self.optimizer is not self.inner and self.optimizer is not None:
            for name, value in vars(self.optimizer).items():
                if "ipg" in name or "bucket" in name:
                    for t in _tensors(value):
                        add("buffers", t)
        for p in params + masters:
            add("grads", p.grad)
        if self.optimizer is not self.inner and self.optimizer is not None:
            for name, value in vars(self.optimizer).items():
                kind = "grads" if "grad" in name else "other"
                for t in _tensors(value):
                    add(kind, t)
        return out


def _tensors(value, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside containers and DeepSpeed's small helper objects (bucket classes), a few levels deep."""
    if depth > 4:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif type(value).__module__.startswith("deepspeed") and hasattr(value, "__dict__") and not callable(value):
        for v in vars(value).values():
            yield from _tensors(v, depth + 1)


class ActivationMeter:
    """High-water mark of the bytes autograd keeps for backward (activations), parameters excluded.

    A ``saved_tensors_hooks`` pack hook sees every tensor an op saves; storages are counted once
    while any saved reference to them lives, and released when autograd drops the last one (after
    backward, or when the graph is freed). Under a pipeline several micro-batches are in flight, so
    the peak covers them all, as the device's memory does.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._param_shapes = {tuple(getattr(p, "ds_shape", p.shape)) for p in module.parameters()}
        self._param_ptrs: set[int] = set()
        self._live: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self.current = self.peak = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        self.peak = self.current
        self._param_ptrs = self._parameter_storages()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield

    def _parameter_storages(self) -> set[int]:
        return {p.data.untyped_storage().data_ptr() for p in self.module.parameters() if p.data.numel()}

    def _is_parameter(self, ptr: int, t: torch.Tensor) -> bool:
        if ptr in self._param_ptrs:
            return True
        # ZeRO-3 gathers parameters into fresh storage inside forward: look again for weight shapes.
        if tuple(t.shape) in self._param_shapes or tuple(reversed(t.shape)) in self._param_shapes:
            self._param_ptrs = self._parameter_storages()
            return ptr in self._param_ptrs
        return False

    def _pack(self, t: torch.Tensor):
        found = _storage(t)
        if found is None or self._is_parameter(found[0], t):
            return t
        entry = self._live.setdefault(found[0], [0, found[1]])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(t, self, found[0])

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[ptr]


@dataclass
class _Saved:
    """A saved tensor; tells the meter when autograd lets go of it."""

    tensor: torch.Tensor
    meter: ActivationMeter = field(repr=False)
    ptr: int = 0

    def __del__(self):
        self.meter._release(self.ptr)


def _unpack(saved):
    return saved.tensor if isinstance(saved, _Saved) else saved
