"""``python -m trainer.prepare [overrides]``: tokenize the configured corpus into the cache, no training.

Takes the same config as ``trainer.train``, so the cache it fills is the one training reads.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config.cli import EXIT_BAD_INPUT, preflight
from trainer.config.schema import BadInput, Config
from trainer.data.setup import prepare_data


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg_node: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(cfg_node)
    try:
        prepared = prepare_data(cfg)
    except BadInput as err:
        print(err, file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(
        f"data {cfg.data.name}: {prepared.train_tokens:,} train / {prepared.val_tokens:,} val tokens, "
        f"vocabulary {prepared.vocab_size:,} ({prepared.dtype}) in {prepared.directory}"
    )


if __name__ == "__main__":
    # Preparing is not a run: no run directory, no Hydra log files.
    preflight(sys.argv[1:])
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    main()
