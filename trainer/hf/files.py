"""Output directories the conversions write (staged, so a failure leaves nothing half-written) and the
tokenizer files they carry along."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

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


def write_safetensors(path: Path, items, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> None:
    """A safetensors file written a tensor at a time: the header (every name, dtype F32, shape and byte
    range) first, then each ``produce()`` of ``items`` ((name, produce) pairs, in order), so the peak is
    one tensor, not the model. The same bytes ``safetensors.torch.save_file`` writes for fp32 tensors."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, _ in items:
        size = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, produce in items:
            tensor = produce().to(torch.float32).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: produced shape {list(tensor.shape)}, the header says {list(shapes[name])}")
            handle.write(tensor.numpy().tobytes())
            del tensor  # before the next one is produced
