"""Shared fixtures: config composition, and running the real entry points in subprocesses."""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config.cli import register
from trainer.config.schema import Config
from trainer.runtime.env import free_port

ROOT = Path(__file__).resolve().parents[1]
# Intra-op threads of every test process and of the runs it launches (OMP_NUM_THREADS, which the trainer honours
# over its own split of the cores): the Makefile's 2 pytest workers each start up to 2 ranks at a time, and
# OpenMP threads beyond the cores spin against each other. On 2 cores the inference tests took 440 s with the
# trainer's split (2 threads for a one-process run and in the workers) and 185 s with one thread each.
TEST_THREADS = max(1, (os.cpu_count() or 1) // 4)
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VENV_BIN = Path(sys.executable).parent
# Forks run_train's processes from a server that imported torch and DeepSpeed once (see the script).
RANKS_SCRIPT = ROOT / "tests" / "ranks.py"

# Relative tolerance of every parity check of a layout against the single-process reference (losses,
# gradient norms, resharded resumes): layouts sum in different orders, so fp32 rounding differs.
PARITY_RTOL = 1e-5
# Element-wise closeness of sharded against dense tensors in the in-process parallel tests.
CLOSE = {"atol": 1e-5, "rtol": 0}
# The layouts the launcher tests run, by name: (ranks, overrides). 0 ranks = one process, no launcher.
# Names are the comparison's (trainer.analysis.compare.runner.parse_layout), so "pp2-dp2" is pp2 at world 4.
LAYOUTS = {
    "single": (0, []),
    "dp2": (2, ["parallel=dp"]),
    "zero1-dp2": (2, ["parallel=zero1"]),
    "zero2-dp2": (2, ["parallel=zero2"]),
    "zero3-dp2": (2, ["parallel=zero3"]),
    "tp2": (2, ["parallel=tp2"]),
    "tp2-sp": (2, ["parallel=tp2-sp"]),
    "tp2-dp2-zero1": (4, ["parallel=tp2-zero1"]),
    "tp2-dp2-zero3": (4, ["parallel=zero3", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel=pp2"]),
    "pp4": (4, ["parallel=pp4"]),
    "tp2-pp2": (4, ["parallel=tp2-pp2"]),
    "pp2-dp2": (4, ["parallel=pp2"]),
    "pp2-dp2-zero1": (4, ["parallel=pp2-zero1"]),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose_config(overrides: list[str] = ()) -> tuple[Config, object]:
    """The typed config (and its node) exactly as ``trainer.train`` would compose it."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        node = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(node), node


@pytest.fixture
def compose_cfg():
    return compose_config


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def english_text() -> str:
    """Tiny Shakespeare (1.1 MB of real English) from ../shared/data, checked against its sha256."""
    data = SHAKESPEARE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256, "damaged copy of tinyshakespeare.txt"
    return data.decode("utf-8")


def small_corpus(directory: Path) -> Path:
    """A small real corpus file: Tiny Shakespeare where the checkout has ../shared/data beside it,
    else the first ~1 MB of this Python's standard-library sources (present everywhere)."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    path = directory / "stdlib-sample.txt"
    if not path.is_file():
        from trainer.data.prepare import stdlib_files

        texts, size = [], 0
        for file in stdlib_files():
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
            size += len(texts[-1])
            if size > 1_000_000:
                break
        path.write_text("\n\n".join(texts))
    return path


def tiny_corpus_overrides(cache_dir: Path) -> list[str]:
    """A small real corpus with a small tokenizer: fast to prepare."""
    return [
        "data=files",
        f"data.paths=[{small_corpus(cache_dir)}]",
        f"data.cache_dir={cache_dir}",
        "data.tokenizer.vocab_size=512",
    ]


def padded_smoke_overrides(cache_dir: Path) -> list[str]:
    """debug=smoke on the small real corpus with a vocabulary of 511 rows that tp2 pads to 512 (so a tensor-parallel
    layout's padding rows are exercised): the shared base of the export, decoding and evaluation tests."""
    return [
        "debug=smoke",
        "data=files",
        f"data.paths=[{small_corpus(cache_dir)}]",
        f"data.cache_dir={cache_dir}",
        "data.tokenizer.vocab_size=500",
        "model.vocab_size=511",
    ]


def train_command(run_dir: Path, overrides: list[str], ranks: int = 0, launcher: str = "deepspeed") -> list[str]:
    """``trainer.train`` as one process (ranks=0), or ``ranks`` of it started by the deepspeed launcher
    (``launcher="deepspeed"``); with ``launcher="ranks"`` either is forked by this worker's tests/ranks.py
    server (the same environment per rank, without importing torch and DeepSpeed again; see there)."""
    args = [*overrides, f"hydra.run.dir={run_dir}"]
    if launcher == "ranks":
        return [sys.executable, str(RANKS_SCRIPT), ranks_server(), str(ranks), str(free_port()), "-m", "trainer.train",
                *args]  # fmt: skip
    if not ranks:
        return [sys.executable, "-m", "trainer.train", *args]
    deepspeed = ["deepspeed", "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(free_port())]
    return [*deepspeed, "--module", "trainer.train", *args]


@functools.cache
def ranks_server() -> str:
    """The socket of this pytest process's tests/ranks.py server, started on first use (its imports take a
    few seconds) and stopped when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="ranks-"))
    path, log = folder / "socket", (folder / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(RANKS_SCRIPT), "serve", str(path)], cwd=ROOT, env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    atexit.register(proc.kill)
    atexit.register(shutil.rmtree, folder, True)
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"tests/ranks.py server failed: {(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.05)
    return str(path)


def run_train(run_dir: Path, overrides: list[str], ranks: int = 0, timeout: int = 300, launcher: str = "ranks"):
    """Run ``trainer.train`` to the end; the completed process (stdout, stderr as text). Its processes are
    forked by tests/ranks.py unless ``launcher="deepspeed"`` (the tests of the launcher's own behaviour start
    the real one with ``start_train`` / ``train_command``).

    On timeout the launcher is killed, and with it the ranks it started (the deepspeed launcher's share its
    new session; tests/ranks.py's supervisor kills them when its client goes), so a hung run never outlives
    its test.
    """
    cmd = train_command(run_dir, overrides, ranks, launcher)
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_layout(name: str, run_dir: Path, overrides: list[str], timeout: int = 300):
    """``run_train`` at the named layout of ``LAYOUTS`` (its overrides after ``overrides``)."""
    ranks, extra = LAYOUTS[name]
    return run_train(run_dir, [*overrides, *extra], ranks, timeout)


def start_train(run_dir: Path, overrides: list[str], ranks: int = 0) -> subprocess.Popen:
    """Start ``trainer.train`` in its own process group (so a test can kill all of it at once)."""
    cmd = train_command(run_dir, overrides, ranks)
    out = (run_dir.parent / f"{run_dir.name}.out").open("w")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-corpus cache shared by the tests of a session."""
    return tmp_path_factory.mktemp("data-cache")


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))  # a user's setting wins
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
