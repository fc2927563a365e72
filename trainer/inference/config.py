"""The typed configs of ``python -m trainer.generate`` (``conf/generate.yaml``) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import ConfigError
from trainer.inference.decode import Sampling

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerateConfig:
    ckpt: str = ""  # a step / checkpoints / run directory of any layout, or a Hugging Face model directory
    prompt: str = ""  # the text to continue (quote it for Hydra when it has commas: prompt="'a, b'")
    prompts_file: str = ""  # or a file of prompts, one per line (blank lines skipped)
    tokenizer: str = ""  # tokenizer.json or its directory; default: the checkpoint's own
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    seed: int = 0  # of the sampler (each prompt starts from it)
    stop_at_eot: bool = True  # end a continuation at the end-of-text token
    cache: bool = True  # key/value cache (false: every step re-reads the whole sequence; for comparison)
    device: str = "auto"  # auto | cpu | cuda

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def validate_generate(cfg: GenerateConfig) -> None:
    """Everything that needs no model: one ConfigError naming the key."""
    if not cfg.ckpt:
        raise ConfigError(
            "ckpt", "", "give a checkpoint (step, checkpoints or run directory) or a Hugging Face directory"
        )
    if not Path(cfg.ckpt).exists():
        raise ConfigError("ckpt", cfg.ckpt, "no such file or directory")
    problem = cfg.sampling().problem()
    if problem:
        raise ConfigError(*problem)
    if cfg.device not in DEVICES:
        raise ConfigError("device", cfg.device, f"must be one of {', '.join(DEVICES)}")
    if bool(cfg.prompt) == bool(cfg.prompts_file):
        raise ConfigError("prompt", cfg.prompt, "give a non-empty prompt=... or prompts_file=..., not both")
    if cfg.prompts_file and not prompts_of(cfg):
        raise ConfigError("prompts_file", cfg.prompts_file, "no such file, or it has no non-blank line")


def prompts_of(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt:
        return [cfg.prompt]
    path = Path(cfg.prompts_file)
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
