"""Check a command line before Hydra runs it: every job it asks for must compose and validate.

Hydra reports an unknown option or a mistyped value with several lines and exit code 1, after
creating a run directory. The entry points call ``preflight`` first, so every bad input ends the
same way: one line naming the key, the value and the fix, exit code 2, nothing written. The ranks a launcher
starts on one node check alike, so a line one of them printed the others leave out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from trainer.config.rundir import launch_id, register_resolvers
from trainer.config.schema import BadInput, Config, ConfigError
from trainer.config.validate import validate
from trainer.runtime.env import world_size_from_env

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EXIT_BAD_INPUT = 2
FREE_FORM = "speed.deepspeed_extra"  # a dict whose keys the schema does not list


def register() -> None:
    """Make the typed schema and the resolvers known to Hydra (before composing anything)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    ConfigStore.instance().store(name="trainer_schema", node=Config)


def _overrides(argv: list[str]):
    """The config overrides on a command line (flags like -m and Hydra's own keys left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as err:  # Hydra's parser error names the offending override
        raise BadInput(f"config error: cannot parse the command line: {one_line(err)}") from None
    return [o for o in parsed if not o.is_hydra_override()]


def _jobs(overrides) -> list[list[str]]:
    """One override list per job to check: every value of every sweep appears in at least one."""
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    sweeps = [(o.get_key_element(), list(o.sweep_string_iterator())) for o in overrides if o.is_sweep_override()]
    firsts = [f"{key}={values[0]}" for key, values in sweeps]
    jobs = [fixed + firsts]
    for i, (key, values) in enumerate(sweeps):
        for value in values[1:]:
            jobs.append(fixed + firsts[:i] + [f"{key}={value}"] + firsts[i + 1 :])
    return jobs


def _check_auto_degrees(job: list[str], cfg: Any) -> None:
    """A degree named on the command line beside parallel=auto contradicts it, even at its default value (which
    ``validate_auto_degrees``, seeing only the composed config, cannot tell from an unset one)."""
    from trainer.config.validate import AUTO_CHOSEN, auto_conflict

    parallel = getattr(cfg, "parallel", None)
    if not getattr(parallel, "auto", False):
        return
    for override in job:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("parallel.") and key.removeprefix("parallel.") in (*AUTO_CHOSEN, "dp_sync"):
            raise auto_conflict(key, value)


def _check_group_choice(override: str) -> None:
    key, _, value = override.partition("=")
    group = key.lstrip("+~")
    if "." in group or not (CONF_DIR / group).is_dir() or value in ("null", ""):
        return
    if not (CONF_DIR / group / f"{value}.yaml").is_file():
        options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(group, value, f"no such option; choose one of: {options}")


def one_line(err: BaseException) -> str:
    """The message of ``err`` and of its causes (Hydra puts the useful part there) on one line."""
    parts: list[str] = []
    while err is not None:
        lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
        parts += [line for line in lines if not line.startswith(("reference_type", "object_type", "full_key"))]
        err = err.__cause__
    return "; ".join(dict.fromkeys(parts)) or "invalid configuration"


def _compose_node(job: list[str], config_name: str):
    """Hydra's composed DictConfig (the caller catches composition errors)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=job)
    finally:
        GlobalHydra.instance().clear()


def compose(job: list[str], config_name: str = "config") -> Any:
    """The typed config of ``conf/<config_name>.yaml`` with these overrides; BadInput naming the key if
    it does not compose or names a key the config does not have. Its schema must be registered
    (``register`` for the trainer's)."""
    from omegaconf import OmegaConf

    try:
        # Hydra refuses a key the config lacks unless it is ``+``-added, so only then is the (second)
        # composition that names unknown keys needed before this one; after a failure it names the key.
        if any(o.startswith("+") for o in job):
            _check_known_keys(job, config_name)
        try:
            node = _compose_node(job, config_name)
        except Exception:
            _check_known_keys(job, config_name)
            raise
        return OmegaConf.to_object(node)
    except BadInput:
        raise
    except Exception as err:  # composition errors: wrong types, missing values
        raise BadInput(f"config error: {one_line(err)}") from None


def _is_group_choice(override: str) -> bool:
    group = override.partition("=")[0].lstrip("+~")
    return "." not in group and (CONF_DIR / group).is_dir()


def _check_known_keys(job: list[str], config_name: str) -> None:
    """Refuse an override of a key the config does not have, ``+``-appended ones included (Hydra would
    add those silently, and a mistyped ``+trian.steps=5`` would train with the default), suggesting the
    closest key. The keys are those of the config composed with the job's group choices."""
    import difflib

    choices = [o for o in job if _is_group_choice(o)]
    keys = set(_flat_keys(_compose_node(choices, config_name)))
    for override in job:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if override in choices or key in keys:
            continue
        if key.startswith(f"{FREE_FORM}."):  # DeepSpeed's own keys, checked by validate (extra_problem)
            continue
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the Configuration reference in README.md"
        raise ConfigError(key, value, f"no such key; {hint}")


def _flat_keys(node, prefix: str = ""):
    """Every dotted key of a composed config, inner nodes included."""
    from omegaconf import DictConfig

    for key in node:
        dotted = f"{prefix}{key}"
        yield dotted
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _flat_keys(child, f"{dotted}.")


def check_command_line(argv: list[str], config_name: str, check: Callable[[Any], None]) -> None:
    """Exit with code 2 and one line on stderr unless every job of this command line composes
    ``conf/<config_name>.yaml`` and passes ``check``."""
    try:
        for job in _jobs(_overrides(argv)):
            for override in job:
                _check_group_choice(override)
            cfg = compose(job, config_name)
            _check_auto_degrees(job, cfg)
            check(cfg)
    except BadInput as err:
        exit_bad_input(err)


def preflight(argv: list[str]) -> None:
    """The trainer's command line: every job composes, validates at the launcher's world size and fits
    this rank's memory (``trainer.training.preflight``)."""
    register()
    check_command_line(argv, "config", _check_job)


def _check_job(cfg: Config) -> None:
    from trainer.analysis.planner.auto import resolve_parallel
    from trainer.runtime.engine import resolve_device
    from trainer.training.preflight import check_memory

    cfg = resolve_parallel(cfg, world_size_from_env())
    validate(cfg, world_size_from_env())
    check_memory(cfg, world_size_from_env(), resolve_device(cfg.train.device))


def print_bad_input(err: BadInput) -> None:
    """The one stderr line every entry point gives for bad input ("config error: " names a config key)."""
    prefix = "config error: " if isinstance(err, ConfigError) else ""
    line = f"{prefix}{err}"
    if first_to_say(line):
        print(line, file=sys.stderr)


def first_to_say(line: str) -> bool:
    """False when a rank of the same launch on this node (the same launcher process) has printed ``line``:
    the first to create a file named by the launch and the line says it. A line only some ranks give (one GPU
    short of memory) is still said."""
    if "LOCAL_RANK" not in os.environ:
        return True
    digest = hashlib.sha256(line.encode()).hexdigest()[:16]
    said = f"trainer-said-{os.getuid()}-{os.getppid()}-{launch_id()}-{digest}"
    try:
        os.close(os.open(Path(tempfile.gettempdir()) / said, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no temporary directory to agree through: say it
        return True
    return True


def exit_bad_input(err: BadInput) -> NoReturn:
    print_bad_input(err)
    sys.exit(EXIT_BAD_INPUT)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")  # argparse wraps it
        print(f"error: {message} (usage: {usage})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run_cli(command: Callable[[], str]) -> int:
    """Run ``command``; print its summary line, or the one-line reason it refused (exit code 2).

    Only input problems are caught: anything else is a bug and keeps its traceback.
    """
    from safetensors import SafetensorError

    try:
        print(command())
    except (BadInput, ValueError, OSError, SafetensorError) as err:  # Unsupported is a ValueError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
