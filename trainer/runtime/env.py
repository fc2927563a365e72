"""What a process learns from its launcher's environment before any process group exists."""

from __future__ import annotations

import os
import socket


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
    """A TCP port on the loopback interface that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
