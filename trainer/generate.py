"""Entry point: ``python -m trainer.generate ckpt=PATH prompt="..." [max_new_tokens=64 temperature=0.8 top_k=200
top_p=1.0 seed=0 prompts_file=FILE cache=true device=auto]``.

Loads a checkpoint of any layout (or a Hugging Face GPT-2 / Llama directory) on one process
(``trainer.inference.load``) and continues each prompt, streaming the new text to stdout as it comes and one
line of counts and speed to stderr (``trainer.inference.decode``). Bad input (missing or damaged checkpoint,
empty prompt, a prompt that with ``max_new_tokens`` exceeds the model's context, invalid sampling values) is
one line and exit code 2.
"""

from __future__ import annotations

import sys
import time

from trainer.config.cli import check_command_line, exit_bad_input
from trainer.config.schema import BadInput, ConfigError
from trainer.inference.config import GenerateConfig, prompts_of, register, validate_generate


def main(argv: list[str]) -> None:
    register()
    configs: list[GenerateConfig] = []
    check_command_line(argv, "generate", lambda cfg: (validate_generate(cfg), configs.append(cfg)))
    try:
        run(configs[-1])
    except BadInput as err:
        exit_bad_input(err)


def run(cfg: GenerateConfig) -> None:
    import torch

    from trainer.data.tokenizer import load_tokenizer, saved_eot
    from trainer.inference.decode import generate
    from trainer.inference.load import load

    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    loaded = load(cfg.ckpt, device)
    source = cfg.tokenizer or loaded.tokenizer
    if not source:
        raise ConfigError("tokenizer", "", f"{loaded.source} has no tokenizer; give tokenizer=PATH")
    tok = load_tokenizer(source)
    eos = tok.token_to_id(saved_eot(source)) if cfg.stop_at_eot else None  # the run's data.tokenizer.eot
    context = loaded.shape.seq_len
    print(f"# {loaded.source}: {loaded.model.num_params():,} parameters, context {context}", file=sys.stderr)
    if cfg.max_new_tokens >= context:
        raise ConfigError("max_new_tokens", cfg.max_new_tokens, f"must be below the model's context {context}")
    for text in prompts_of(cfg):
        ids = tok.encode(text).ids
        room = loaded.shape.seq_len - cfg.max_new_tokens
        if not ids or len(ids) > room:
            raise ConfigError(
                "prompt",
                text[:40] + ("..." if len(text) > 40 else ""),
                f"{len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} it must be 1..{room} tokens "
                f"(the model's context is {loaded.shape.seq_len}): shorten it or lower max_new_tokens",
            )
        _continue(loaded.model, tok, ids, text, cfg, eos, generate)


def _continue(model, tok, ids: list[int], text: str, cfg: GenerateConfig, eos, generate) -> None:
    """Print ``text`` and its continuation as it is decoded (whole words: decode the new ids so far and
    print what was added), then a line of counts on stderr."""
    new: list[int] = []
    shown = ""
    sys.stdout.write(text)

    def show(token: int) -> None:
        nonlocal shown
        new.append(token)
        decoded = tok.decode(new)
        sys.stdout.write(decoded[len(shown) :])
        sys.stdout.flush()
        shown = decoded

    started = time.perf_counter()
    generate(model, ids, cfg.sampling(), eos, cfg.cache, show)
    seconds = time.perf_counter() - started
    sys.stdout.write("\n")
    print(f"# {len(ids)} prompt tokens, {len(new)} new, {len(new) / seconds:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
