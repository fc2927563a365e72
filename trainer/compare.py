"""Entry point: ``python -m trainer.compare [compare.*=...] [model/data/optim overrides]``.

Trains every requested layout as its own launch of the trainer and writes a report beside the analytic
model (``trainer.analysis.compare``; docs/compare.md). Exit codes: 0 when every layout ran or was skipped
for a stated reason and at least one ran, 1 when none ran, 2 for bad input.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.config.cli import EXIT_BAD_INPUT, check_command_line, print_bad_input, register
from trainer.config.schema import BadInput


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg_node: DictConfig) -> None:
    from trainer.analysis.compare.report import write_report
    from trainer.analysis.compare.runner import compare, settings_from

    try:
        settings, layouts = settings_from(cfg_node)
        started = time.perf_counter()
        outcomes = compare(settings, layouts)
        table = write_report(outcomes, settings, time.perf_counter() - started)
    except BadInput as err:
        print_bad_input(err)
        _discard_unused(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(EXIT_BAD_INPUT)
    print(table)
    print(f"\nreport: {settings.out / 'report.md'} (results.csv, *.png beside it)")
    if not any(o.status == "ok" for o in outcomes):
        print(f"compare: no layout ran ({len(outcomes)} skipped or failed); see the reasons above", file=sys.stderr)
        sys.exit(1)


def _discard_unused(out: Path) -> None:
    """A comparison refused at start leaves no directory behind (Hydra made it before we could check)."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", "compare.log"}:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    register()  # the trainer's schema: every layout's config is composed and validated before it runs
    check_command_line(sys.argv[1:], "compare", lambda cfg: None)  # unknown keys: one line, before Hydra
    main()
