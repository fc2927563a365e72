"""The instruments a measured step reads: phase clock, DeepSpeed's communication log
(``trainer.training.ds_comms``), tensor memory by kind, saved activations; ``StepInstruments`` holds them
all for one rank. Where the numbers go: ``trainer.training.output``.

Instruments cost time (device syncs, object walks, Python hooks), so the loop runs them only on the
steps it logs; every other step runs bare.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.analysis.formulas import wire_bytes
from trainer.training.ds_comms import DeepSpeedComms

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


# --- all of them, for one step ---------------------------------------------------------------------


class StepInstruments:
    """The instruments of one rank, switched on together for the steps the loop logs (``begin(True)``)
    and returning what they measured as records (``trainer.training.record``).

    ``tp_comm`` is the tensor-parallel layers' own counter (trainer.parallel.mappings.CommStats), ``dp_comm``
    the data-parallel synchronisation's (trainer.parallel.dp_sync), both reset every step; DeepSpeed's
    collectives come from its logger.
    """

    def __init__(
        self, module: nn.Module, optimizer, device: torch.device, tp_comm, tp_size: int, dp_comm, dp_size: int
    ):
        self.module, self.device, self.tp_comm, self.tp_size = module, device, tp_comm, tp_size
        self.dp_comm, self.dp_size = dp_comm, dp_size
        self.ds_comms = DeepSpeedComms()
        self.clock = PhaseClock(device, self._comm_seconds)
        self.census = TensorCensus(module, optimizer)
        self.activations = ActivationMeter(module)
        self.measuring = False
        self._cpu0 = 0.0

    def _comm_seconds(self) -> float:
        return self.ds_comms.seconds() + sum(self.tp_comm[k].seconds for k in self.tp_comm.kinds())

    def begin(self, measure: bool) -> None:
        self.measuring = measure
        self.tp_comm.reset()
        self.dp_comm.reset()
        self.clock.start(measure)
        if measure:
            self.ds_comms.start()
            self.census.reset()
            self._cpu0 = cpu_seconds()

    def saving(self):
        """Around forward passes: counts the activations saved for backward on measured steps."""
        return self.activations.track() if self.measuring else nullcontext()

    def sample_memory(self) -> None:
        if self.measuring:
            self.census.sample()

    def end(self):
        """Stop the measured step's collectives log; (DeepSpeed's, tensor-parallel and data-parallel
        synchronisation Comm, CPU seconds)."""
        from trainer.training.record import Comm

        totals = self.ds_comms.stop()  # before the loop's own reduction of the loss
        cpu_s = cpu_seconds() - self._cpu0
        ds = Comm(
            {k: v.as_dict() for k, v in totals.items()},
            sum(v.bytes for v in totals.values()),
            sum(v.wire_bytes for v in totals.values()),
            sum(v.seconds for v in totals.values()),
        )
        return ds, _comm_of(self.tp_comm, self.tp_size), _comm_of(self.dp_comm, self.dp_size), cpu_s

    def rank_record(self, rank: int, coords: dict, positions: list[int], step_s: float, cpu_s: float, tp, ds, dp):
        """This rank's RankRecord of the measured step."""
        from trainer.training.record import RankRecord, rank_fields

        return RankRecord(
            rank=rank,
            coords=coords,
            positions=positions,
            time=self.clock.breakdown(step_s),
            tp_comm=tp,
            ds_comm=ds,
            dp_comm=dp,
            **rank_fields(self.module, self.device, self.census, self.activations, cpu_s, step_s),
        )

    def close(self) -> None:
        self.ds_comms.close()


def _comm_of(stats, n: int):
    """A ``CommStats`` of collectives over groups of ``n`` ranks as the step record's ``Comm``."""
    from trainer.training.record import Comm

    kinds = stats.snapshot()
    return Comm(
        {k: {"count": r.count, "bytes": r.bytes, "seconds": round(r.seconds, 6)} for k, r in kinds.items()},
        sum(r.bytes for r in kinds.values()),
        sum(wire_bytes(k, r.bytes, n) for k, r in kinds.items()),
        sum(r.seconds for r in kinds.values()),
    )
