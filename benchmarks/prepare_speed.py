"""Out-of-core corpus preparation: throughput and peak memory with 1 and 2 tokenizing workers.

    .venv/bin/python benchmarks/prepare_speed.py [--gb 1.05] [--workers 1 2] [--train-bytes N]
        [--corpus data/cache/bench-corpus]

Builds (once, then reuses) a corpus of at least ``--gb`` GB of text out of files every machine has: the
``.py`` files of this Python's standard library and of the venv's site-packages, written again and again
into ~64 MB files (plus ``../shared/data/tinyshakespeare.txt`` when present). Then prepares it as
``data=files`` does (byte-level BPE of 8,192 trained on it, then tokenized) in a fresh subprocess and a
fresh cache per worker count, sampling the resident memory of that process and its children (psutil,
every 0.25 s): RSS summed (pages shared after fork counted once per process: an upper bound) and PSS
summed (shared pages split between their processes: the tree's real footprint).
Prints one JSON line per run: MB/s overall and of the tokenizing pass, seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PART_BYTES = 64 << 20

RUN = """
import json, shutil, sys, time
from trainer.config.schema import DataConfig, TokenizerConfig
from trainer.data.prepare import prepare
marks = {"start": time.time()}
def log(line):
    if "trained" in line or "loading tokenizer" in line:
        marks["tokenizer_end"] = time.time()
    print(line, file=sys.stderr)
corpus, cache, workers, tokenizer, save, train_bytes = sys.argv[1:]
tok = TokenizerConfig(source=tokenizer or "train")
if train_bytes:
    tok.train_bytes = int(train_bytes)
cfg = DataConfig(name="bench", source="files", paths=[corpus], cache_dir=cache, num_proc=int(workers), tokenizer=tok)
prepared = prepare(cfg, log=log, progress=False)
marks["end"] = time.time()
marks["tokens"] = prepared.train_tokens + prepared.val_tokens
if save:
    shutil.copy(prepared.tokenizer_dir / "tokenizer.json", save)
print(json.dumps(marks))
"""


def build_corpus(directory: Path, target: int) -> int:
    """Fill ``directory`` with at least ``target`` bytes of text (reused when already big enough)."""
    have = sum(p.stat().st_size for p in directory.glob("*.txt")) if directory.is_dir() else 0
    if have >= target:
        return have
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shakespeare = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        shutil.copy(shakespeare, directory / "shakespeare.txt")
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    sources = sorted({p for root in roots for p in root.rglob("*.py") if p.is_file()})
    total = sum(p.stat().st_size for p in directory.glob("*.txt"))
    part, out = 0, None
    while total < target:
        for path in sources:
            if out is None or out.tell() >= PART_BYTES:
                if out is not None:
                    out.close()
                out = open(directory / f"part-{part:04d}.txt", "w", encoding="utf-8")
                part += 1
            text = path.read_text(encoding="utf-8", errors="replace")
            out.write(text + "\n\n")
            total += len(text.encode()) + 2
            if total >= target:
                break
    if out is not None:
        out.close()
    return total


def run(corpus: Path, workers: int, tokenizer: str, save: str, train_bytes: str) -> dict:
    """One preparation in a fresh process: its marks plus peak RSS/PSS of the BPE training and the rest."""
    with tempfile.TemporaryDirectory(dir=corpus.parent) as cache:
        cmd = [sys.executable, "-c", RUN, str(corpus), cache, str(workers), tokenizer, save, train_bytes]
        proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        samples = []  # (time, rss, pss) of the process tree
        while proc.poll() is None:
            try:
                infos = [p.memory_full_info() for p in [proc, *proc.children(recursive=True)]]
                samples.append((time.time(), sum(i.rss for i in infos), sum(i.pss for i in infos)))
            except psutil.Error:
                pass
            time.sleep(0.25)
        out = proc.stdout.read()
        if proc.returncode:
            raise SystemExit(f"preparation with {workers} worker(s) failed (exit {proc.returncode})")
        marks = json.loads(out.strip().splitlines()[-1])
        split = marks.get("tokenizer_end", marks["start"])
        for phase, chosen in (
            ("train_bpe", [s for s in samples if s[0] <= split]),
            ("tokenize", [s for s in samples if s[0] > split]),
        ):
            marks[f"{phase}_peak_rss_gb"] = max((s[1] for s in chosen), default=0) / 1e9
            marks[f"{phase}_peak_pss_gb"] = max((s[2] for s in chosen), default=0) / 1e9
        return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.05)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "cache" / "bench-corpus")
    parser.add_argument("--tokenizer", default="", help="reuse this tokenizer.json (no BPE training)")
    parser.add_argument("--save-tokenizer", default="", help="copy the first run's trained tokenizer.json here")
    parser.add_argument("--train-bytes", default="", help="data.tokenizer.train_bytes (default: the config's)")
    args = parser.parse_args()
    size = build_corpus(args.corpus, int(args.gb * 1e9))
    print(f"corpus: {size / 1e9:.2f} GB in {args.corpus}", flush=True)
    for i, workers in enumerate(args.workers):
        r = run(args.corpus, workers, args.tokenizer, args.save_tokenizer if i == 0 else "", args.train_bytes)
        total_s = r["end"] - r["start"]
        tokenize_s = r["end"] - r.get("tokenizer_end", r["start"])
        result = {
            "workers": workers,
            "train_bytes": args.train_bytes or "default",
            "corpus_gb": round(size / 1e9, 3),
            "tokens": r["tokens"],
            "total_s": round(total_s, 1),
            "mb_per_s": round(size / 1e6 / total_s, 2),
            "tokenizer_s": round(total_s - tokenize_s, 1),
            "tokenize_mb_per_s": round(size / 1e6 / tokenize_s, 2),
        } | {k: round(v, 3) for k, v in r.items() if k.endswith("_gb")}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
