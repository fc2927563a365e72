"""Entry point of the layout planner (``trainer.analysis.planner``; docs/planner.md):

    python -m trainer.plan model=gpt3-175b cluster=dgx-a100 cluster.nodes=128 parallel.global_batch=1536
    python -m trainer.plan model=gpt2-small plan.out=plan.json          # this machine (cluster=cpu-local)
    python -m trainer.plan model=gpt-tiny plan.calibrate=REPORT_DIR     # fit to a trainer.compare report

Bad input ends like the trainer's: one line naming the key and the fix, exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.analysis.planner.run import preflight
from trainer.config.cli import exit_bad_input
from trainer.config.schema import BadInput


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(node: DictConfig) -> None:
    from trainer.analysis.planner.run import run

    try:
        run(OmegaConf.to_object(node))
    except BadInput as err:
        exit_bad_input(err)


if __name__ == "__main__":
    preflight(sys.argv[1:])  # also registers the plan's schema with Hydra
    main()
