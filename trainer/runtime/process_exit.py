"""How a training process ends once its work is done and its process groups are torn down."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def exit_code(stop: SystemExit) -> int:
    """The status ``sys.exit(code)`` would give: None is 0, an int itself, anything else is printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_then_exit(entry: Callable[[], None]) -> NoReturn:
    """Run ``entry`` and end the process with its exit status, skipping the interpreter's teardown.

    Every file the run writes is closed by then (metrics, checkpoints, wandb) and the process groups are
    destroyed, but objects that DeepSpeed and torch still reference (gloo work items, their worker threads)
    are freed by exit-time destructors in no fixed order; now and then one of them ends a finished run
    with std::terminate ("terminate called without an active exception", SIGABRT) after it succeeded.
    A crash with a traceback (not a SystemExit) still takes the ordinary way out.
    """
    try:
        entry()
        code = 0
    except SystemExit as stop:
        code = exit_code(stop)
    logging.shutdown()  # Hydra's train.log handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
