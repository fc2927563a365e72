"""A finished training process leaves with its own exit status and everything it printed or logged."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from trainer.runtime.process_exit import run_then_exit
logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
def entry():
    print("out", end="")
    logging.info("logged")
    {body}
run_then_exit(entry)
"""


@pytest.mark.parametrize(
    ("body", "code", "stderr"),
    [
        ("pass", 0, ""),
        ("sys.exit(75)", 75, ""),
        ("sys.exit(None)", 0, ""),
        ("sys.exit('stopped: why')", 1, "stopped: why"),
    ],
)
def test_exit_status_and_flushed_output(tmp_path, body, code, stderr):
    log = tmp_path / "train.log"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(body=body), "x", str(log)], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (code, "out", stderr)
    assert "logged" in log.read_text()


def test_a_crash_keeps_its_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(body="raise RuntimeError('boom')"), "x", str(tmp_path / "log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
