"""Preemption: a scheduler's warning signal becomes one checkpoint and a distinct exit code.

Clusters end jobs with a signal: Slurm sends SIGTERM at the time limit or on preemption (then SIGKILL
after its KillWait), and ``--signal=USR1@<seconds>`` asks for SIGUSR1 ahead of the limit. On SIGTERM or
SIGUSR1 a rank only notes it; at the end of every step the ranks agree (a one-element all-reduce: a
signal may reach some ranks first), finish together, save one checkpoint of that step and exit with
``EXIT_PREEMPTED``. ``train.resume=auto`` continues from it exactly. A second signal while saving changes
nothing (the save finishes; checkpoints are published atomically in any case, so a kill during the save
leaves the previous one as ``latest``).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- what a requeue is for
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted"  # written into the run directory: the step saved and the signal, for job scripts


class Preempted(Exception):
    """Raised by the training loop once the ranks agreed to stop; ``str`` is the line to print."""

    def __init__(self, step: int, signal_name: str, saved: bool):
        self.step, self.signal_name, self.saved = step, signal_name, saved
        what = f"saved step_{step}; continue with train.resume=auto" if saved else "saving is off (save_interval=-1)"
        super().__init__(f"{signal_name} received: stopped after step {step}, {what}")


class StopSignal:
    """Notes SIGTERM / SIGUSR1 while installed; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.received is None:  # the first signal counts; later ones (e.g. during the save) change nothing
            self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a signal (collective over the world when a process group exists)."""
        flag = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
