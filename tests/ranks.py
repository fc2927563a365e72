"""Start the trainer's processes for the tests, forked from a server that imported torch and DeepSpeed once.

    python tests/ranks.py serve SOCKET                         the server (``conftest`` starts one per pytest worker)
    python tests/ranks.py SOCKET RANKS PORT -m MODULE ARGS...  one run: ``python -m MODULE ARGS`` as one process
                                                               (RANKS 0) or as RANKS ranks of one machine

Every process of the trainer imports torch (2.3 s of CPU on two cores), torch._dynamo (1.7 s: every torch
optimizer imports it) and DeepSpeed and the trainer (0.4 s): about 4.4 CPU-s before its first line of work,
the largest fixed cost of the suite's few hundred runs. The server imports them once and then only forks: per
run a supervisor, which forks the run's processes and does what DeepSpeed's launch.py does for one node
(every rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, CROSS_RANK and
CROSS_SIZE; the first rank to exit non-zero stops the others and its exit code is the run's). The client
(the second form, what ``run_train`` starts) passes its stdin, stdout and stderr, its environment and working
directory to the server and waits for the exit code; SIGTERM or SIGINT to it goes on to the run's processes,
and when it is killed (a test's timeout) they are killed too. Nothing in the server has run a tensor kernel
before a fork (no thread pool to inherit).

The tests of the launcher's own behaviour (a killed rank, a signalled job, several nodes: test_faults,
test_preempt, test_multinode) and ``make train`` run the real ``deepspeed`` launcher.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import sys
import time
import traceback

# Imported by the server: what a process of the trainer imports anyway, the lazily imported ones included.
ENTRY = "trainer.train"
PRELOAD = ("torch", "torch._dynamo", "deepspeed", ENTRY)
STDIO = 3  # stdin, stdout, stderr travel with the request


def run_module(env: dict[str, str], cwd: str, module: str, args: list[str]) -> None:
    """In a forked child: become ``python -m module args`` with this environment, and never return."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[0] = cwd  # as ``python -m`` puts it
    sys.argv = [module, *args]
    random.seed()  # the server's state would be every run's
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # a crash prints its traceback as the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_envs(request: dict) -> list[dict[str, str]]:
    """Each process's environment: the client's, plus launch.py's variables when there are ranks."""
    env, ranks = request["env"], request["ranks"]
    if not ranks:
        return [env]
    common = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]), WORLD_SIZE=str(ranks))
    common.update(LOCAL_SIZE=str(ranks), CROSS_RANK="0", CROSS_SIZE="1")
    return [dict(common, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(ranks)]


def _reap(pids: list[int], codes: dict[int, int]) -> None:
    """Record the exit status of every process that has ended (death by a signal as 128 + its number)."""
    for pid in pids:
        if pid in codes:
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            codes[pid] = 128 - code if code < 0 else code


def _stop(pids: list[int], codes: dict[int, int], grace: float = 10) -> None:
    """SIGTERM to the processes still running, SIGKILL to those not gone ``grace`` seconds later."""
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while len(codes) < len(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap(pids, codes)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = 128 + signal.SIGKILL


def supervise(conn: socket.socket) -> int:
    """In the server's child for one request: start its processes, pass the client's signals on, kill them
    when the client dies, and return the run's exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, STDIO)
    while not data.endswith(b"\n"):
        data += conn.recv(1 << 20)
    request = json.loads(data)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    pids = []
    for env in rank_envs(request):
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_module(env, request["cwd"], request["module"], request["args"])
        pids.append(pid)
    codes: dict[int, int] = {}
    while True:
        _reap(pids, codes)
        failed = next((code for code in codes.values() if code != 0), None)
        if failed is not None:
            _stop(pids, codes)
            return failed
        if len(codes) == len(pids):
            return 0
        if select.select([conn], [], [], 0.1)[0]:
            word = conn.recv(64)
            if not word:  # the client was killed (a test's timeout): so are the run's processes
                _stop(pids, codes, grace=0)
                return 128 + signal.SIGKILL
            for pid in pids:  # a signal to the client goes on to every process still running
                if pid not in codes:
                    os.kill(pid, int(word.split()[0]))


def serve(path: str) -> None:
    """Import the trainer's libraries, then fork a supervisor per connection until the parent goes."""
    for name in PRELOAD:
        importlib.import_module(name)
    # Its imports stay; the module itself is run afresh by each run (runpy warns about one already imported).
    package, _, leaf = ENTRY.rpartition(".")
    del sys.modules[ENTRY], sys.modules[package].__dict__[leaf]
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # clients connect once the imports are done
    server.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the supervisor never returns into this loop
            server.close()
            try:
                conn.sendall(f"{supervise(conn)}\n".encode())
            except (BrokenPipeError, ConnectionResetError):  # the client was killed
                pass
            except BaseException:
                traceback.print_exc()
            os._exit(0)
        conn.close()


def connect(path: str, wait: float = 300) -> socket.socket:
    """A connection to the server at ``path``, waiting for it to finish its imports."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def client(path: str, ranks: int, port: int, module: str, args: list[str]) -> int:
    conn = connect(path)
    request = {"ranks": ranks, "port": port, "module": module, "args": args, "env": dict(os.environ)}
    request["cwd"] = os.getcwd()
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])

    def on_signal(signum, _frame):
        conn.sendall(f"{signum}\n".encode())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            return 1  # the server went away
        reply += chunk
    return int(reply)


def main() -> int:
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
        return 0
    path, ranks, port, flag, module, args = *sys.argv[1:4], sys.argv[4], sys.argv[5], sys.argv[6:]
    if flag != "-m":
        sys.exit("usage: ranks.py SOCKET RANKS PORT -m MODULE ARGS...")
    return client(path, int(ranks), int(port), module, args)


if __name__ == "__main__":
    sys.exit(main())
