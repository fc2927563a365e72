"""Output directories the conversions write (staged, so a failure leaves nothing half-written) and the
tokenizer files they carry along."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from trainer.config.schema import BadInput

# Files that make up a Hugging Face tokenizer directory (those present are copied).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(
            f"{out} already exists and is not an empty directory; remove it or choose another output directory"
        )


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh ``<out>.tmp`` directory to fill, renamed to ``out`` only if the block succeeds, so a
    failure or crash never leaves a half-written ``out``."""
    check_output_dir(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace needs it gone on some systems
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src: Path, dst: Path) -> bool:
    """Copy the HF tokenizer files of directory ``src`` into ``dst``; False if it has no tokenizer.json."""
    if not (src / "tokenizer.json").is_file():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return True


# --- export ---------------------------------------------------------------------------------------
