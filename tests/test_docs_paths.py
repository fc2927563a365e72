"""The committed documentation carries no absolute paths of the machine it was written on.

Reports are copied into docs/ from wherever a comparison ran; the paths they name must be relative to the
report's own folder (``runs/dp4``), not ``/work/...`` or ``/tmp/...`` of one machine. Other absolute paths
that mean the same on every machine (``/dev/shm``, ``/usr/bin/time``) are fine.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A machine's home, work or scratch directory at the start of a path (not "runs/tmp/", a relative path).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home|tmp)/")


def _documents() -> list[Path]:
    docs = [p for p in sorted((ROOT / "docs").rglob("*")) if p.is_file()]
    return [ROOT / "README.md", ROOT / "data" / "README.md", *docs]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary (the plots)
    return data.decode("utf-8")


def test_there_are_documents_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in _documents()}
    assert {"README.md", "docs/compare/results.csv", "docs/compare/report.md"} <= names


@pytest.mark.parametrize("path", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_machine_paths(path: Path):
    text = _text(path)
    if text is None:
        return
    hits = [
        f"line {n}: {line.strip()[:120]}" for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)
    ]
    assert not hits, "absolute paths of one machine; write them relative to the report's folder:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line, found",
    [
        ("Run `/work/main/runs/compare/x/runs/dp4`", True),
        ("ok,,/tmp/cmp_fresh/runs/baseline,a7dnme4o", True),
        ("data.paths=[/home/me/corpus]", True),
        ("cd /root/gpt", True),
        ("Run `runs/dp4`, a relative path", False),
        ("gloo keeps its buffers in /dev/shm", False),
        ("see runs/tmp/ or data/home/", False),
    ],
)
def test_pattern(line: str, found: bool):
    assert bool(MACHINE_PATH.search(line)) is found
