"""What a process learns from its launcher's environment before any process group exists."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RENDEZVOUS_PORTS = 12000  # how many ports below that range free_port draws from


def adopt_mpi_env() -> None:
    """Ranks started by mpirun (``launch/multinode.sh --launcher openmpi``) carry Open MPI's variables, not
    the RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE that the deepspeed launcher sets: copy them over.
    MASTER_ADDR and MASTER_PORT arrive forwarded by the launch script."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return
    for ours, theirs in (
        ("RANK", "OMPI_COMM_WORLD_RANK"),
        ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
        ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ):
        os.environ[ours] = os.environ[theirs]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Ranks on this machine (the deepspeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a rendezvous).

    Drawn below the kernel's ephemeral range where there is room: a port from that range (what binding port 0
    gives) can be taken, before the rendezvous binds it, as the local end of any outgoing connection on the
    machine, and every gloo process group opens one per peer (EADDRINUSE at the rendezvous, seen with a few
    launched runs at once). Below the range only listeners compete, and the draw is random (not from the
    seeded ``random``: runs started alike would draw alike)."""
    low, high = _below_ephemeral()
    draw = random.SystemRandom()
    for _ in range(100 if high - low >= 1000 else 0):
        port = draw.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _below_ephemeral() -> tuple[int, int]:
    """Up to RENDEZVOUS_PORTS ports just below the ephemeral range (Linux's default: 32768-60999), above 1023."""
    try:
        first = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    return max(1024, first - RENDEZVOUS_PORTS), first
