"""Several nodes, simulated on one machine: two "nodes" of 2 CPU ranks each form one world of 4.

- Two ``deepspeed --no_ssh --node_rank {0,1}`` launchers started side by side (what each node of a
  cluster runs; what launch/slurm.sbatch and ``launch/multinode.sh --no_ssh`` generate) train tp2 x dp2
  with per-step losses equal to the single-node world-4 run of the same layout, within 1e-5 relative.
- A node that dies (SIGKILL) or hangs (SIGSTOP: a frozen machine, a cut network) stops the other node's
  launcher with a non-zero exit within ``train.collective_timeout_s`` + 30 s instead of a hang.
- launch/multinode.sh from one node: DeepSpeed's pdsh runner with a stand-in ``pdsh`` that starts each
  "remote" node here in a clean environment (as ssh would), so TRAINER_LAUNCH_ID must travel through the
  DeepSpeed environment file the script writes.
- launch/slurm.sbatch: its generated per-node commands equal the simulation's (``DRY_RUN=1``), and, where
  the Slurm binaries are installed, it runs for real on a two-node Slurm cluster started on localhost.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PARITY_RTOL, ROOT, child_env, free_port, read_metrics, run_train, tiny_corpus_overrides
from trainer.training.preempt import EXIT_PREEMPTED, MARKER

STEPS = 5
RANKS_PER_NODE = 2
LAYOUT = ["parallel=tp2-zero1"]  # world 4 = tp 2 x dp 2: each node holds one tp pair (Megatron order)
BATCH = ["parallel.micro_batch=4", "parallel.global_batch=8"]
COLLECTIVE_TIMEOUT_S = 20
LAUNCH_TIMEOUT_S = 300


def _overrides(data_cache: Path, *extra: str, layout: list[str] = LAYOUT) -> list[str]:
    return ["debug=smoke", *tiny_corpus_overrides(data_cache), f"train.steps={STEPS}", *layout, *BATCH, *extra]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _deviation(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference) == STEPS, (losses, reference)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def _write_hostfile(path: Path, hosts=("node0", "node1"), slots: int = RANKS_PER_NODE) -> Path:
    # With --no_ssh the names are never resolved: the file gives the number of nodes, their order, their slots.
    path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return path


def node_command(
    hostfile: Path, node_rank: int, master_addr: str, port: int, overrides: list[str], ranks: int = RANKS_PER_NODE
) -> list[str]:
    """What node ``node_rank`` of a two-node launch runs (no ssh: each node starts its own ranks)."""
    return [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--num_nodes",
        "2",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(port),
        "--num_gpus",
        str(ranks),
        "--no_local_rank",
        "--module",
        "trainer.train",
        *overrides,
    ]


def _launcher_env(**extra: str) -> dict[str, str]:
    """child_env without the launch settings the scripts read (this test may itself run inside a Slurm job)."""
    names = ("MASTER_ADDR", "NODE_RANK", "NUM_NODES", "GPUS_PER_NODE", "LAUNCHER", "FORWARD_ENV", "DS_ENV_FILE")
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_") and k not in names}
    env.update(extra)
    return env


class Nodes:
    """Two node launchers running side by side, each in its own process group (a "machine")."""

    def __init__(self, tmp: Path, overrides: list[str], launch_id: str, ranks_per_node: int = RANKS_PER_NODE):
        self.tmp = tmp
        hostfile = _write_hostfile(tmp / "hostfile", slots=ranks_per_node)
        port = free_port()
        env = child_env(TRAINER_LAUNCH_ID=launch_id)
        self.logs = [tmp / f"node{i}.log" for i in range(2)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(
                        node_command(hostfile, rank, "127.0.0.1", port, overrides, ranks_per_node),
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def log(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def signal(self, node: int, sig: int) -> None:
        try:
            os.killpg(self.procs[node].pid, sig)  # the launcher and the ranks it started
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def stop(self) -> None:
        for node, proc in enumerate(self.procs):
            self.signal(node, signal.SIGKILL)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> list[float]:
    """The same layout on one node: world 4 through the single-node launcher."""
    run_dir = tmp_path_factory.mktemp("one-node")
    proc = run_train(run_dir, _overrides(data_cache), ranks=2 * RANKS_PER_NODE, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(run_dir)


@pytest.mark.slow
def test_two_nodes_train_like_one(tmp_path, data_cache, reference):
    # The run directory comes from TRAINER_LAUNCH_ID on each node; without one shared value the nodes,
    # started at different times, would name different directories and the trainer would refuse.
    launch_id = f"two-nodes-{os.getpid()}"
    nodes = Nodes(tmp_path, _overrides(data_cache, f"hydra.run.dir={tmp_path}/runs/${{launch_id:}}"), launch_id)
    try:
        codes = nodes.wait(LAUNCH_TIMEOUT_S)
    finally:
        nodes.stop()
    assert codes == [0, 0], f"node 0:\n{nodes.log(0)[-3000:]}\nnode 1:\n{nodes.log(1)[-3000:]}"
    assert "world 4 = tp 2 x pp 1 x dp 2" in nodes.log(0)
    assert "nnodes=2, num_local_procs=2, node_rank=1" in nodes.log(1)
    losses = _losses(tmp_path / "runs" / launch_id)
    deviation = _deviation(losses, reference)
    print(f"\ntwo nodes x 2 ranks (tp2 x dp2) vs one node x 4 ranks: max rel deviation {deviation:.2e}")
    for step, (a, b) in enumerate(zip(losses, reference), 1):
        print(f"  step {step}: two nodes {a:.8f}  one node {b:.8f}")
    assert deviation < PARITY_RTOL, (losses, reference)


def _first_step_logged(nodes: Nodes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "step      1/" not in nodes.log(0):
        codes = [p.poll() for p in nodes.procs]
        if any(c is not None for c in codes):
            pytest.fail(
                f"a node ended before training started ({codes}):\n{nodes.log(0)[-3000:]}\n{nodes.log(1)[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no training step within {timeout} s:\n{nodes.log(0)[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(signal.SIGKILL, id="node-killed"),  # its sockets close: peers see a reset at once
        pytest.param(signal.SIGSTOP, id="node-hung"),  # sockets stay open: only the collective timeout helps
    ],
)
def test_lost_node_stops_the_other(tmp_path, data_cache, failure):
    # One rank per node (world 2, ZeRO-1 data parallel) starts faster; what is tested is the launchers.
    overrides = _overrides(
        data_cache,
        f"hydra.run.dir={tmp_path}/run",
        f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
        layout=["parallel=zero1"],
    )
    overrides = [o for o in overrides if not o.startswith("train.steps=")] + ["train.steps=100000"]
    nodes = Nodes(tmp_path, overrides, f"lost-node-{os.getpid()}", ranks_per_node=1)
    try:
        _first_step_logged(nodes, LAUNCH_TIMEOUT_S)
        nodes.signal(1, failure)
        lost = time.monotonic()
        bound = COLLECTIVE_TIMEOUT_S + 30
        try:
            code = nodes.procs[0].wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {bound} s after node 1 was lost:\n{nodes.log(0)[-3000:]}")
        elapsed = time.monotonic() - lost
    finally:
        nodes.stop()
    print(f"\nnode 1 {signal.Signals(failure).name}: node 0 exited with {code} after {elapsed:.1f} s")
    assert code != 0
    assert elapsed < bound


# --- launch/multinode.sh from one node, through DeepSpeed's pdsh runner ---

FAKE_PDSH = r"""#!/usr/bin/env bash
# Stand-in for pdsh: runs the remote command once per host of -w on this machine, %n replaced by the host's
# index, in a clean environment as a fresh ssh login would give it, the nodes 2 s apart.
hosts=
while [[ $# -gt 0 ]]; do
  case $1 in -w) hosts=$2; shift 2 ;; -f) shift 2 ;; -S) shift ;; *) break ;; esac
done
command="$*"
echo "$command" >"$FAKE_PDSH_LOG/command"
rank_pattern='%n'
node=0
pids=()
for host in ${hosts//,/ }; do
  env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "${command//"$rank_pattern"/$node}" >"$FAKE_PDSH_LOG/$host.log" 2>&1 &
  pids+=($!)
  node=$((node + 1))
  sleep 2
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { r=$?; ((r > rc)) && rc=$r; }
done
exit $rc
"""


@pytest.mark.slow
def test_multinode_script_forwards_the_launch_id(tmp_path, data_cache, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH)
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")  # DeepSpeed's reachability check
    for tool in ("pdsh", "ssh"):
        (bin_dir / tool).chmod(0o755)
    hostfile = _write_hostfile(tmp_path / "hostfile")
    launch_id = f"pdsh-{os.getpid()}"
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    env = _launcher_env(
        TRAINER_LAUNCH_ID=launch_id,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        FAKE_PDSH_LOG=str(tmp_path),
        TMPDIR=str(env_tmp),
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    overrides = _overrides(data_cache, f"hydra.run.dir={tmp_path}/runs/${{launch_id:}}")
    proc = subprocess.run(
        [str(ROOT / "launch" / "multinode.sh"), str(hostfile), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    logs = {
        h: (tmp_path / f"{h}.log").read_text() if (tmp_path / f"{h}.log").exists() else "" for h in ("node0", "node1")
    }
    assert proc.returncode == 0, (
        f"{proc.stderr[-2000:]}\nnode0:\n{logs['node0'][-3000:]}\nnode1:\n{logs['node1'][-3000:]}"
    )
    remote = (tmp_path / "command").read_text()
    assert f"export TRAINER_LAUNCH_ID={launch_id};" in remote
    assert "export HF_HUB_OFFLINE=1;" in remote and "export WANDB_MODE=disabled;" in remote
    if (ROOT / ".venv" / "bin").is_dir():  # ssh logins lack the environment's tools (ninja) on PATH
        assert f'export PATH="{ROOT}/.venv/bin:$PATH";' in remote
    losses = _losses(tmp_path / "runs" / launch_id)
    deviation = _deviation(losses, reference)
    print(f"\nmultinode.sh (pdsh runner, 2 nodes) vs one node: max rel deviation {deviation:.2e}")
    assert deviation < PARITY_RTOL, (losses, reference)
    assert not list(env_tmp.iterdir())  # the environment file is removed when the launch ends


FAKE_SSH = r"""#!/usr/bin/env bash
# Stand-in for ssh: drops the options and the host and runs the command here, in a clean environment.
while [[ $1 == -* ]]; do case $1 in -o | -p | -l | -i) shift 2 ;; *) shift ;; esac; done
shift
exec env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "$*"
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None or shutil.which("ompi_info") is None, reason="Open MPI absent")
def test_multinode_script_with_openmpi(tmp_path, data_cache, reference):
    """``--launcher openmpi``: mpirun starts the ranks itself (through a stand-in ssh that runs them here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    launch_id = f"openmpi-{os.getpid()}"
    env = _launcher_env(TRAINER_LAUNCH_ID=launch_id, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    mpirun_args = f"--mca plm_rsh_agent {bin_dir}/ssh --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
    if os.geteuid() == 0:
        mpirun_args = "--allow-run-as-root " + mpirun_args
    overrides = _overrides(data_cache, f"hydra.run.dir={tmp_path}/runs/${{launch_id:}}")
    proc = subprocess.run(
        [str(ROOT / "launch" / "multinode.sh"), "--launcher", "openmpi", "--launcher_args", mpirun_args]
        + [str(_write_hostfile(tmp_path / "hostfile")), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"-x TRAINER_LAUNCH_ID={launch_id}" in proc.stdout + proc.stderr
    losses = _losses(tmp_path / "runs" / launch_id)
    deviation = _deviation(losses, reference)
    print(f"\nmultinode.sh --launcher openmpi (2 nodes) vs one node: max rel deviation {deviation:.2e}")
    assert deviation < PARITY_RTOL, (losses, reference)


def test_multinode_script_commands(tmp_path):
    """DRY_RUN=1: the commands launch/multinode.sh builds, for each mode."""
    hostfile = _write_hostfile(tmp_path / "hostfile")
    base = _launcher_env(DRY_RUN="1", MASTER_PORT="29555", TRAINER_LAUNCH_ID="dry")
    script = str(ROOT / "launch" / "multinode.sh")

    def dry(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)

    # --no_ssh: exactly what the two-node simulation runs on each node
    for rank in (0, 1):
        out = dry("--no_ssh", str(hostfile), "a=1", "b=[x y]", NODE_RANK=str(rank), GPUS_PER_NODE="2")
        assert out.returncode == 0, out.stderr
        words = shlex.split(out.stdout)
        assert words[0] == "TRAINER_LAUNCH_ID=dry"
        assert words[1:] == node_command(hostfile, rank, "node0", 29555, ["a=1", "b=[x y]"])
    refused = dry("--no_ssh", str(hostfile), NODE_RANK="0", TRAINER_LAUNCH_ID="")
    assert refused.returncode == 2 and "TRAINER_LAUNCH_ID" in refused.stderr
    assert dry("--no_ssh", str(hostfile)).returncode == 2  # no NODE_RANK

    # pdsh (default) and openmpi: the launch id and the rendezvous travel in the DeepSpeed environment file
    out = dry(str(hostfile), "a=1", GLOO_SOCKET_IFNAME="eth1", WANDB_API_KEY="secret")
    assert out.returncode == 0, out.stderr
    first, *forwarded = out.stdout.splitlines()
    words = shlex.split(first)
    assert words[0].startswith("DS_ENV_FILE=/")
    assert words[1:8] == ["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--master_addr", "node0"]
    assert words[-4:] == ["--no_local_rank", "--module", "trainer.train", "a=1"]
    assert "  forwarded: TRAINER_LAUNCH_ID=dry" in forwarded and "  forwarded: GLOO_SOCKET_IFNAME=eth1" in forwarded
    assert not any("WANDB_API_KEY" in line for line in forwarded)
    if (ROOT / ".venv" / "bin").is_dir():
        assert f"  forwarded: PATH={ROOT}/.venv/bin:$PATH" in forwarded
    out = dry("--launcher", "openmpi", str(hostfile), "a=1", MASTER_ADDR="10.0.0.1")
    assert out.returncode == 0, out.stderr
    assert "--launcher openmpi --master_addr 10.0.0.1" in out.stdout
    assert "  forwarded: MASTER_ADDR=10.0.0.1" in out.stdout and "  forwarded: MASTER_PORT=29555" in out.stdout
    assert dry("--launcher", "openmpi", str(hostfile), GPUS_PER_NODE="2").returncode == 2  # mpirun reads slots
    assert dry("--launcher", "srun", str(hostfile)).returncode == 2
    assert dry(str(tmp_path / "missing")).returncode == 2


# --- launch/slurm.sbatch ---


def _slurm_dry_run(tmp_path: Path, overrides: list[str], **env: str) -> list[list[str]]:
    """Each node's command from slurm.sbatch with DRY_RUN=1 under a made-up two-node allocation."""
    # A stand-in scontrol expands the node list (the real one needs a configured cluster); it is a plain list here.
    fake = tmp_path / "fake-bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    (fake / "scontrol").chmod(0o755)
    allocation = dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node0,node1",
        SLURM_SUBMIT_DIR=str(ROOT),
        TMPDIR=str(tmp_path),
        DRY_RUN="1",
    )
    run_env = _launcher_env(**allocation, **env)
    run_env["PATH"] = f"{fake}:{run_env['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *overrides],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_slurm_script_generates_the_simulated_commands(tmp_path, data_cache):
    overrides = _overrides(data_cache, "hydra.run.dir=x")
    lines = _slurm_dry_run(tmp_path, overrides, GPUS_PER_NODE="2", MASTER_PORT="29566")
    assert len(lines) == 2
    hostfile = tmp_path / "gpt-trainer-4242.hosts"
    assert hostfile.read_text() == "node0 slots=2\nnode1 slots=2\n"
    for rank, words in enumerate(lines):
        assert words[0] == "TRAINER_LAUNCH_ID=slurm-4242"
        # The simulation's command for this node, with the allocation's first host as the rendezvous.
        assert words[1:] == node_command(hostfile, rank, "node0", 29566, overrides)
    # Defaults: GPUs from SLURM_GPUS_ON_NODE (a typed count too), the port from the job id.
    words = _slurm_dry_run(tmp_path, ["a=1"], SLURM_GPUS_ON_NODE="h100:4")[1]
    assert words[words.index("--num_gpus") + 1] == "4"
    assert words[words.index("--master_port") + 1] == str(20000 + 4242 % 10000)


def _run_slurm_script(tmp_path: Path, srun_rc: int, marker: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    """slurm.sbatch (not a dry run) with stand-ins: an srun that exits ``srun_rc`` (after writing the
    preemption marker, if asked) and an scontrol that expands node lists and records what else it is told."""
    fake = tmp_path / "fake-bin"
    fake.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.calls"
    (fake / "scontrol").write_text(
        f'#!/bin/sh\nif [ "$1 $2" = "show hostnames" ]; then echo "$3" | tr , "\\n"; else echo "$@" >>{calls}; fi\n'
    )
    mark = f"mkdir -p runs/slurm-4242 && touch runs/slurm-4242/{MARKER}\n" if marker else ""
    (fake / "srun").write_text(f"#!/bin/sh\n{mark}exit {srun_rc}\n")
    for tool in ("scontrol", "srun"):
        (fake / tool).chmod(0o755)
    root = tmp_path / "project"
    (root / "trainer").mkdir(parents=True, exist_ok=True)
    (root / "trainer" / "train.py").touch()  # the script checks it stands in the project root
    allocation = dict(
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="node0,node1",
        SLURM_SUBMIT_DIR=str(root), GPUS_PER_NODE="2",
    )  # fmt: skip
    run_env = _launcher_env(**allocation)
    run_env["PATH"] = f"{fake}:{run_env['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "debug=smoke"],
        cwd=root,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, calls.read_text() if calls.is_file() else ""


@pytest.mark.parametrize(("srun_rc", "marker"), [(EXIT_PREEMPTED, False), (1, True)])
def test_slurm_script_requeues_a_preempted_job(srun_rc, marker, tmp_path):
    proc, calls = _run_slurm_script(tmp_path, srun_rc, marker)
    assert proc.returncode == 0, proc.stderr
    assert calls == "requeue 4242\n" and "requeued" in proc.stdout


def test_slurm_script_passes_other_failures_on_without_requeue(tmp_path):
    proc, calls = _run_slurm_script(tmp_path, 1)
    assert proc.returncode == 1 and calls == ""


def test_requeued_slurm_job_continues_from_its_checkpoint(tmp_path):
    first = _slurm_dry_run(tmp_path, ["debug=smoke"], GPUS_PER_NODE="2")[0]
    again = _slurm_dry_run(tmp_path, ["debug=smoke"], GPUS_PER_NODE="2", SLURM_RESTART_COUNT="1")[0]
    assert "train.resume=auto" not in first
    assert again == [*first, "train.resume=auto"]  # last, so it wins over the submitted command's own


def test_slurm_script_asks_for_the_signal_and_launchers_ignore_it():
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    assert 'trap "" USR1 TERM' in script


def _slurm_missing() -> list[str]:
    return [
        b for b in ("slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "munged", "mungekey") if not shutil.which(b)
    ]


class SlurmCluster:
    """slurmctld and two slurmd on this machine, with munge, all in a temp dir.

    Node names: this machine's name and ``<name>-n1`` (both reach this machine through NodeHostname and
    NodeAddr). Slurm orders a job's nodes by name, so the first host, which slurm.sbatch takes as the
    rendezvous address, is the machine's own name, which resolves here. Where it does not, the job is
    given MASTER_ADDR=127.0.0.1 instead.
    """

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: munge's socket path is limited
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        self.env = {"SLURM_CONF": str(d / "slurm.conf")}
        user = getpass.getuser()
        self.nodes = [socket.gethostname(), f"{socket.gethostname()}-n1"]
        self.job_env = {}
        try:
            socket.gethostbyname(self.nodes[0])
        except OSError:
            self.nodes = ["n0", "n1"]
            self.job_env = {"MASTER_ADDR": "127.0.0.1"}
        ctld, slurmd_port, n0, n1 = (free_port() for _ in range(4))
        (d / "slurm.conf").write_text(
            f"""ClusterName=mini
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={self.nodes[0]} NodeHostname=localhost NodeAddr=127.0.0.1 Port={n0} CPUs={os.cpu_count()} State=UNKNOWN
NodeName={self.nodes[1]} NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        try:
            self._start(str(d / "slurm.conf"))
        except Exception as err:
            stderr = getattr(err, "stderr", b"") or b""
            logs = "".join(f"\n--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted((d / "log").glob("*.log")))
            self.stop()  # what did start
            raise RuntimeError(f"a local Slurm cluster did not start: {err}\n{stderr.decode()}{logs}") from err

    def _start(self, conf: str) -> None:
        d = self.dir
        self._run("mungekey", "--create", f"--keyfile={d}/munge.key")
        self._run(
            "munged",
            "--force",
            f"--socket={d}/munge.sock",
            f"--key-file={d}/munge.key",
            f"--pid-file={d}/munged.pid",
            f"--log-file={d}/log/munged.log",
            f"--seed-file={d}/munged.seed",
        )
        self._run("slurmctld", "-f", conf)
        for node in self.nodes:
            self._run("slurmd", "-f", conf, "-N", node)
        deadline = time.monotonic() + 60
        while True:
            states = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=child_env(**self.env), capture_output=True, text=True
            ).stdout.split()
            if states == ["idle", "idle"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after 60 s ({states})")
            time.sleep(0.5)

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, env=child_env(**self.env), check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        for pid_file in sorted(self.dir.glob("*.pid")):  # the daemons this fixture started, by their pids
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError, IndexError):
                pass
        time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = _slurm_missing()
    if missing:
        pytest.skip(
            f"Slurm binaries absent ({', '.join(missing)}): "
            "test_slurm_script_generates_the_simulated_commands checks the generated commands instead"
        )
    cluster = SlurmCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_script_runs_on_two_slurm_nodes(tmp_path, data_cache, reference, slurm_cluster):
    overrides = _overrides(data_cache, f"hydra.run.dir={tmp_path}/runs/${{launch_id:}}")
    out = tmp_path / "slurm-%j.out"
    env = _launcher_env(
        **slurm_cluster.env, **slurm_cluster.job_env, GPUS_PER_NODE=str(RANKS_PER_NODE), TMPDIR=str(tmp_path)
    )
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--nodes=2", f"--output={out}", "launch/slurm.sbatch", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    job = proc.stdout.strip().split(";")[0]
    log = Path(str(out).replace("%j", job))
    text = log.read_text(errors="replace") if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{text[-4000:]}"
    first, second = slurm_cluster.nodes
    master = slurm_cluster.job_env.get("MASTER_ADDR", first)
    assert f"job {job} on {first} {second}: 2 ranks per node, rendezvous {master}:" in text
    losses = _losses(tmp_path / "runs" / f"slurm-{job}")
    deviation = _deviation(losses, reference)
    print(f"\nslurm.sbatch on 2 Slurm nodes x 2 ranks vs one node: max rel deviation {deviation:.2e}")
    assert deviation < PARITY_RTOL, (losses, reference)
