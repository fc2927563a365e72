"""Entry point: ``python -m trainer.baseline [overrides]``: the same model, data and optimizer as
``trainer.train`` in a plain PyTorch loop on one process (no DeepSpeed), the reference the comparison
measures every layout against (``trainer.training.baseline``). fp32 only; exit code 2 for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config.cli import exit_bad_input, preflight
from trainer.config.schema import BadInput, Config, ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg_node: DictConfig) -> None:
    from trainer.training.baseline import run

    try:
        cfg: Config = OmegaConf.to_object(cfg_node)
        if cfg.parallel.precision != "fp32":
            raise ConfigError("parallel.precision", cfg.parallel.precision, "the baseline trains in fp32 only")
        run(cfg, cfg_node, Path(HydraConfig.get().runtime.output_dir))
    except BadInput as err:
        exit_bad_input(err)


if __name__ == "__main__":
    preflight(sys.argv[1:])  # also registers the schema with Hydra
    main()
