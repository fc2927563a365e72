"""Start the ranks of one machine as the deepspeed launcher does, without its start-up cost.

    python tests/ranks.py RANKS PORT COMMAND...      (e.g. ... 2 29500 python -u -m trainer.train debug=smoke)

``deepspeed --num_gpus N`` runs two Python processes before any rank starts (its runner, then launch.py), each
importing torch and DeepSpeed: about 6 s of wall time and 5 s of CPU per run on two cores, the largest fixed cost
of the suite's launched runs. Tests whose subject is not the launcher (the layout matrices, resume, precision,
checkpoints) start their ranks with this script; the tests of the launcher's own behaviour (a killed rank, a
signalled job, several nodes: test_faults, test_preempt, test_multinode) and ``make train`` run the real one.

What DeepSpeed's launch.py does for one node is kept: every rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
MASTER_ADDR, MASTER_PORT, CROSS_RANK and CROSS_SIZE; the first rank to exit non-zero stops the others and its
exit code is this script's; SIGTERM and SIGINT stop every rank. No torch here: this starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def start(ranks: int, port: int, command: list[str]) -> list[subprocess.Popen]:
    common = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    common.update(LOCAL_SIZE=str(ranks), CROSS_RANK="0", CROSS_SIZE="1")
    return [subprocess.Popen(command, env=dict(common, RANK=str(r), LOCAL_RANK=str(r))) for r in range(ranks)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ranks, port, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    procs = start(ranks, port, command)

    def on_signal(signum, _frame):
        stop(procs)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        codes = [proc.poll() for proc in procs]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is not None:
            stop(procs)
            return failed
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
