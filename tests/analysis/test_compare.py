"""trainer.compare: layout names, bad input, and the report of a real (tiny) comparison.

The comparison tests train a few layouts at world 2 for a few steps (gpt-tiny: the baseline and two layouts;
llama-tiny: three) and check the report's schema and the numbers that must agree with the analytic model
exactly or closely: parameter, gradient and optimizer memory per rank, and the communication volume
(llama-tiny also its activations). They assert no timings.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, tiny_corpus_overrides
from trainer.analysis.compare.report import RANK_FIELDS, RESULT_FIELDS
from trainer.analysis.compare.runner import auto_layouts, parse_layout
from trainer.analysis.planner.calibrate import REQUIRED
from trainer.config.schema import BadInput

TINY_MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.seq_len=32", "model.vocab_size=512"]
LLAMA_TINY = ["model=llama-tiny", "model.seq_len=32", "model.vocab_size=512"]  # the tokenizer's 512 tokens


def test_layout_names_give_degrees():
    lay = parse_layout("tp2-dp2-zero1", 4)
    assert (lay.tp, lay.pp, lay.dp, lay.zero, lay.sp, lay.ranks) == (2, 1, 2, 1, False, 4)
    assert parse_layout("tp4-sp", 4).sp
    full, selective = parse_layout("tp2-sp-full2", 2), parse_layout("pp2-sel", 2)
    assert (full.recompute, full.checkpoint_every, selective.recompute) == ("full", 2, "selective")
    assert "parallel.activation_checkpoint_interval=2" in full.overrides()
    assert parse_layout("pp2", 4).dp == 2  # the data-parallel degree is what the world leaves
    assert parse_layout("baseline", 4).baseline and parse_layout("single", 4).ranks == 1
    with pytest.raises(BadInput, match="unknown layout 'fsdp'"):
        parse_layout("fsdp", 4)


def test_auto_layouts_cover_every_family():
    names = auto_layouts(4)
    assert names[:2] == ["baseline", "single"]
    for expected in ("dp4", "zero1-dp4", "zero2-dp4", "zero3-dp4", "tp4", "tp4-sp", "pp4", "tp2-pp2", "pp2-dp2"):
        assert expected in names


def _compare(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.compare", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def _small_comparison(out, layouts: list[str], *overrides: str) -> subprocess.CompletedProcess:
    """``layouts`` at world 2, 1 warm-up step and 2 measured, micro-batch 2 of a global 8, into ``out``."""
    common = ["compare.world=2", "compare.warmup_steps=1", "compare.steps=2", "compare.micro_batch=2"]
    common += ["compare.global_batch=8", "compare.wandb_mode=disabled", f"compare.out={out}"]
    return _compare(*common, f"compare.layouts=[{','.join(layouts)}]", *overrides)


@pytest.mark.parametrize(
    "args,message",
    [
        (["compare.layouts=[dp2,fsdp]"], "unknown layout 'fsdp'"),
        (["compare.world=0"], "compare.world=0: must be a whole number >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = _compare(*args, f"compare.out={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_comparison_in_which_nothing_ran_says_so_and_fails(tmp_path):
    proc = _compare("compare.world=1", "compare.layouts=[dp2]", f"compare.out={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[dp2] skipped" in proc.stdout and "no layout ran" in proc.stderr


@pytest.mark.slow
def test_report_of_a_small_comparison(tmp_path, data_cache):
    out = tmp_path / "cmp"
    layouts = ["baseline", "dp2", "tp2", "tp2-pp2"]
    proc = _small_comparison(out, layouts, *TINY_MODEL, *tiny_corpus_overrides(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| layout |" in proc.stdout  # the headline table is printed
    report = (out / "report.md").read_text()
    for section in ("# Parallel layouts compared", "### baseline", "### dp2", "### tp2", "## How it is measured"):
        assert section in report
    assert "tp2-pp2 (" in report and "skipped" in report and "must divide the world size 2" in report
    for plot in ("throughput", "memory", "communication", "time", "loss"):
        assert (out / f"{plot}.png").stat().st_size > 0
    layouts = _read_csv(out / "results.csv")
    assert list(layouts[0]) == RESULT_FIELDS
    assert set(REQUIRED) <= set(RESULT_FIELDS)  # what trainer.analysis.planner's calibration reads
    by_name = {row["layout"]: row for row in layouts}
    assert [by_name[n]["status"] for n in ("baseline", "dp2", "tp2", "tp2-pp2")] == ["ok", "ok", "ok", "skipped"]
    assert (by_name["tp2"]["tp"], by_name["tp2"]["dp"], by_name["dp2"]["dp"]) == ("2", "1", "2")
    assert by_name["dp2"]["run_dir"] == "runs/dp2"  # relative to the report's folder: the folder can move
    ranks = _read_csv(out / "ranks.csv")
    assert list(ranks[0]) == RANK_FIELDS
    assert [row["layout"] for row in ranks] == ["baseline", "dp2", "dp2", "tp2", "tp2"]
    _assert_agrees_with_the_analytic_model(ranks)
    losses = [float(by_name[n]["final_loss"]) for n in ("baseline", "dp2", "tp2")]
    assert max(losses) - min(losses) < 1e-3  # same model, same data: same losses


@pytest.mark.slow
def test_llama_tiny_comparison(tmp_path, data_cache):
    """llama-tiny (grouped-query attention 4/2, SwiGLU, RMSNorm, rotary, untied head) against the same analytic
    model at gpt-tiny's tolerances: one process, tp2 with SP (the RMSNorms' weights are the only replicated
    gradients) and pp2 (the untied head: no tied-embedding all-reduce between the end stages)."""
    out = tmp_path / "cmp"
    layouts = ["single", "tp2-sp", "pp2"]
    proc = _small_comparison(out, layouts, *LLAMA_TINY, *tiny_corpus_overrides(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_name = {row["layout"]: row for row in _read_csv(out / "results.csv")}
    assert [by_name[n]["status"] for n in layouts] == ["ok"] * 3
    ranks = _read_csv(out / "ranks.csv")
    assert [row["layout"] for row in ranks] == ["single", "tp2-sp", "tp2-sp", "pp2", "pp2"]
    _assert_agrees_with_the_analytic_model(ranks)
    for row in ranks:
        # measured +6..8 % (torch's unfused CPU RMSNorm keeps x·rsqrt, the formula counts dropout masks that
        # dropout 0 does not store); tp2-sp +15 % as for gpt-tiny (the all-gathered inputs are saved whole)
        measured, predicted = float(row["activations_bytes"]), float(row["predicted_activations_bytes"])
        assert measured == pytest.approx(predicted, rel=0.20 if row["layout"] == "tp2-sp" else 0.10), row["layout"]
    losses = [float(by_name[n]["final_loss"]) for n in layouts]
    assert max(losses) - min(losses) < 1e-3


@pytest.mark.slow
def test_full_recompute_comparison(tmp_path, data_cache):
    """Full recompute in runs of 2 blocks: at pp 1 torch's checkpoint repeats the run's forward collectives but
    the last, a pipeline stage recomputes only its runs that are all blocks (DeepSpeed's reentrant checkpoint).
    The collectives match the analytic count exactly and the activations (a recomputed run keeps its input)
    within 15 % (measured 6-9 % under: the formula counts dropout masks that dropout 0 does not keep)."""
    out = tmp_path / "cmp"
    layouts = ["tp2-sp-full2", "pp2-full2"]
    proc = _small_comparison(out, layouts, *TINY_MODEL, "model.n_layer=4", *tiny_corpus_overrides(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = _read_csv(out / "ranks.csv")
    assert [row["layout"] for row in ranks] == ["tp2-sp-full2", "tp2-sp-full2", "pp2-full2", "pp2-full2"]
    assert "tp2·pp1·dp1, ZeRO-0, SP, full recompute" in proc.stdout
    _assert_agrees_with_the_analytic_model(ranks)
    for row in ranks:
        measured, predicted = float(row["activations_bytes"]), float(row["predicted_activations_bytes"])
        print(f"{row['layout']} rank {row['rank']}: activations {measured:,.0f} B measured, {predicted:,.0f} predicted")
        assert measured == pytest.approx(predicted, rel=0.15), row["layout"]


def _assert_agrees_with_the_analytic_model(ranks: list[dict]) -> None:
    """Per rank: parameters exactly, model states within 10 %, communication within 0.1 %, the tensor-parallel
    collectives' count and bytes exactly."""
    for row in ranks:
        assert int(row["shard_params"]) == round(float(row["predicted_params"]))
        for kind in ("params", "grads", "master", "optimizer"):
            measured, predicted = float(row[f"{kind}_bytes"]), float(row[f"predicted_{kind}_bytes"])
            assert measured == pytest.approx(predicted, rel=0.10, abs=64), (row["layout"], kind)
        # DeepSpeed's collectives and the TP layers' match the analytic count (a few scalar all-reduces aside)
        assert float(row["comm_wire_bytes"]) == pytest.approx(float(row["predicted_comm_wire_bytes"]), rel=1e-3)
        assert row["tp_count"] == row["predicted_tp_count"]
        assert float(row["tp_bytes"]) == float(row["predicted_tp_bytes"])


def _read_csv(path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))
