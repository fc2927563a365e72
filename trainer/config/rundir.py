"""Names shared by every rank of one launch: the launch id (run directory) and the project root.

Each rank runs ``@hydra.main`` itself, so a run directory taken from each rank's clock could differ
by a second between ranks. All ranks started by one launcher share their parent process, so its
start time is a launch id they agree on without talking to each other. ``TRAINER_LAUNCH_ID`` (set
by ``launch/*.sh``, and needed across nodes) takes precedence.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_STAMP = "%Y-%m-%d_%H-%M-%S"
_FALLBACK = time.strftime(_STAMP)  # single process: fixed at import, so a multirun shares it


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process, from /proc (Linux); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def launch_id() -> str:
    if os.environ.get("TRAINER_LAUNCH_ID"):
        return os.environ["TRAINER_LAUNCH_ID"]
    if "LOCAL_RANK" in os.environ:  # started by a launcher: the parent is shared by all local ranks
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime(_STAMP, time.localtime(started))
    return _FALLBACK


def register_resolvers() -> None:
    """`${launch_id:}`, `${project_root:}` and `${min:a,b}` for the YAML configs."""
    for name, fn in (("launch_id", launch_id), ("project_root", lambda: str(PROJECT_ROOT)), ("min", min)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
