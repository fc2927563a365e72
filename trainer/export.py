"""Entry point: ``python -m trainer.export CHECKPOINT OUT_DIR [--tokenizer DIR]``.

Writes a checkpoint of any parallel layout as a Hugging Face directory: ``GPT2LMHeadModel`` or
``LlamaForCausalLM`` by the model's architecture (``trainer.hf.export``).
CHECKPOINT is a step directory, a checkpoints directory (the step its ``latest`` names) or a run
directory. Exit code 2 with one line for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.config.cli import OneLineParser, run_cli


def main(argv: list[str] | None = None) -> int:
    from trainer.hf.export import export

    parser = OneLineParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="step directory, checkpoints directory or run directory")
    parser.add_argument("out_dir", type=Path, help="new Hugging Face model directory")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer directory or tokenizer.json (default: the checkpoint's)"
    )
    args = parser.parse_args(argv)
    return run_cli(lambda: export(args.checkpoint, args.out_dir, args.tokenizer))


if __name__ == "__main__":
    sys.exit(main())
