"""Start the ranks of one machine as the deepspeed launcher does, without its start-up cost.

    python tests/ranks.py RANKS PORT -m MODULE ARGS...   (e.g. ... 2 29500 -m trainer.train debug=smoke)

``deepspeed --num_gpus N`` runs two Python processes before any rank starts (its runner, then launch.py), each
importing torch and DeepSpeed, and then every rank imports them again: on two cores about 4.4 CPU-s per
process (torch 2.3 s, torch._dynamo 1.7 s, which every torch optimizer imports, DeepSpeed and the trainer
0.4 s), the largest fixed cost of the suite's launched runs. This script imports MODULE and those libraries
once and forks the ranks from there, so each rank starts with them imported and runs MODULE as ``python -m``
would. Nothing has run a tensor kernel before the fork (no thread pool to inherit). Tests whose subject is
not the launcher (the layout matrices, resume, precision, checkpoints) start their ranks with this script;
the tests of the launcher's own behaviour (a killed rank, a signalled job, several nodes: test_faults,
test_preempt, test_multinode) and ``make train`` run the real one.

What DeepSpeed's launch.py does for one node is kept: every rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
MASTER_ADDR, MASTER_PORT, CROSS_RANK and CROSS_SIZE; the first rank to exit non-zero stops the others and its
exit code is this script's; SIGTERM and SIGINT stop every rank.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys
import time

# Imported before the fork: what a rank of the trainer imports anyway, the lazily imported ones included.
PRELOAD = ("torch", "torch._dynamo", "deepspeed")


def run_rank(env: dict[str, str], module: str, args: list[str]) -> None:
    """In the forked child: become one rank running ``python -m module args`` and never return."""
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # a crash prints its traceback as the interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(ranks: int, port: int, module: str, args: list[str]) -> list[int]:
    for name in (*PRELOAD, module):
        importlib.import_module(name)
    common = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    common.update(LOCAL_SIZE=str(ranks), CROSS_RANK="0", CROSS_SIZE="1")
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(ranks):
        pid = os.fork()
        if pid == 0:
            run_rank(dict(common, RANK=str(rank), LOCAL_RANK=str(rank)), module, args)
        pids.append(pid)
    return pids


def stop(pids: list[int], codes: dict[int, int]) -> None:
    """Terminate the ranks still running; kill those that have not gone 10 s later."""
    running = [pid for pid in pids if pid not in codes]
    for pid in running:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while running and time.monotonic() < deadline:
        running = [pid for pid in running if not _reap(pid, codes)]
        time.sleep(0.05)
    for pid in running:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _reap(pid: int, codes: dict[int, int]) -> bool:
    """Record the exit status of ``pid`` if it has ended (a signal's death as 128 + its number)."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] < 0:
            codes[pid] = 128 - codes[pid]
    return bool(done)


def main() -> int:
    ranks, port, flag, module, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    if flag != "-m":
        sys.exit("usage: ranks.py RANKS PORT -m MODULE ARGS...")
    pids, codes = start(ranks, port, module, args), {}

    def on_signal(signum, _frame):
        stop(pids, codes)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        for pid in pids:
            if pid not in codes:
                _reap(pid, codes)
        failed = next((code for code in codes.values() if code != 0), None)
        if failed is not None:
            stop(pids, codes)
            return failed
        if len(codes) == len(pids):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
