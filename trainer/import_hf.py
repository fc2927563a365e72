"""Entry point: ``python -m trainer.import_hf HF_DIR OUT_STEP_DIR``.

Turns a local Hugging Face GPT-2 or Llama directory into a checkpoint step directory that ``train.init_from``
loads at any layout (``trainer.hf.importer``). Exit code 2 with one line for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.config.cli import OneLineParser, run_cli


def main(argv: list[str] | None = None) -> int:
    from trainer.hf.importer import import_hf

    parser = OneLineParser(prog="python -m trainer.import_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="local Hugging Face GPT-2 or Llama directory")
    parser.add_argument("out_step_dir", type=Path, help="new checkpoint step directory")
    args = parser.parse_args(argv)
    return run_cli(lambda: import_hf(args.hf_dir, args.out_step_dir))


if __name__ == "__main__":
    sys.exit(main())
