"""tests/ranks.py, which starts the launched runs of the suite: each process gets the launcher's environment,
the first failure stops the run with its code, a signal to the client reaches the processes, and a killed
client (a test's timeout) takes them with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import RANKS_SCRIPT, child_env, ranks_server
from trainer.runtime.env import free_port

# Run as ``-m probe`` by each process: writes its pid, prints its launcher variables, then acts by rank
# (PROBE_<rank>: "exit:N" exits N, "sleep" waits for a signal; SIGTERM exits 75, as a preempted run does).
PROBE = """
import os, signal, sys, time
rank = os.environ.get("RANK", "-")
open(f"pid_{rank}", "w").write(str(os.getpid()))
print("env", rank, *(os.environ.get(k, "-") for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "CROSS_SIZE")))
sys.stdout.flush()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
action = os.environ.get(f"PROBE_{rank}", "exit:0")
if action == "sleep":
    time.sleep(60)
sys.exit(int(action.partition(":")[2] or 0))
"""


def _start(tmp_path: Path, ranks: int, **actions: str) -> tuple[subprocess.Popen, int]:
    (tmp_path / "probe.py").write_text(PROBE)
    port = free_port()
    env = child_env(**{f"PROBE_{rank}": action for rank, action in actions.items()})
    cmd = [sys.executable, str(RANKS_SCRIPT), ranks_server(), str(ranks), str(port), "-m", "probe"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, port


def _pids(tmp_path: Path, ranks: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pid_*"))) < ranks and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the last pid file written whole
    return [int(p.read_text()) for p in sorted(tmp_path.glob("pid_*"))]


def _gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_each_rank_gets_the_launchers_environment(tmp_path):
    proc, port = _start(tmp_path, 3)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = sorted(line for line in out.splitlines() if line.startswith("env"))
    assert lines == [f"env {r} {r} 3 {port} 1" for r in range(3)]


def test_one_process_has_no_launcher_variables(tmp_path):
    proc, _ = _start(tmp_path, 0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "env - - - - -" in out


def test_first_failure_stops_the_others_with_its_code(tmp_path):
    proc, _ = _start(tmp_path, 2, **{"0": "sleep", "1": "exit:3"})
    proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert all(_gone(pid) for pid in _pids(tmp_path, 2))


def test_a_signal_to_the_client_reaches_the_ranks(tmp_path):
    proc, _ = _start(tmp_path, 2, **{"0": "sleep", "1": "sleep"})
    pids = _pids(tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75  # the ranks' own exit code, from their SIGTERM handler
    assert all(_gone(pid) for pid in pids)


def test_a_killed_client_takes_its_ranks_along(tmp_path):
    proc, _ = _start(tmp_path, 2, **{"0": "sleep", "1": "sleep"})
    pids = _pids(tmp_path, 2)
    os.killpg(proc.pid, signal.SIGKILL)  # what run_train does on a timeout
    proc.communicate(timeout=30)  # the ranks hold its stdout: it closes when they are gone (they sleep 60 s)
    assert all(_gone(pid) for pid in pids)
