"""``parallel=auto``: the planner's choice is a function of its inputs (ranks of a cpu-local launch share one
measurement), and an auto run trains exactly the explicit run of the layout it chose."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import yaml

from conftest import PARITY_RTOL, read_metrics, run_train, tiny_corpus_overrides
from trainer.analysis.planner import auto
from trainer.analysis.planner.auto import resolve_parallel
from trainer.config.cli import compose, register
from trainer.config.schema import BadInput
from trainer.config.validate import parallel_overrides, validate


def _config(*overrides: str):
    register()
    return compose(["parallel=auto", "parallel.cluster=h100-sxm", "model=gpt2-small", *overrides])


def test_the_choice_is_a_function_of_the_inputs():
    cfg = _config("parallel.global_batch=64")
    first, again = resolve_parallel(cfg, 8), resolve_parallel(cfg, 8)
    assert first == again and first.parallel.chosen.name and first.parallel.runner_up.name
    validate(first, 8)  # an ordinary layout from here on
    lean = resolve_parallel(_config("parallel.global_batch=64", "parallel.objective=memory"), 8).parallel
    fast = first.parallel
    assert lean.chosen.memory_gb <= fast.chosen.memory_gb and lean.chosen.tokens_per_s <= fast.chosen.tokens_per_s
    assert fast.chosen.tokens_per_s >= fast.runner_up.tokens_per_s
    assert lean.chosen.memory_gb <= lean.runner_up.memory_gb


def test_a_given_micro_batch_is_kept():
    p = resolve_parallel(_config("parallel.global_batch=64", "parallel.micro_batch=2"), 8).parallel
    assert p.micro_batch == 2 and "-mb2-" in p.chosen.name and "-mb2-" in p.runner_up.name


def test_ranks_of_one_launch_share_one_measurement(monkeypatch, tmp_path):
    """cpu-local's numbers differ between measurements; the second rank reads the first one's."""
    measured = iter(range(1, 100))

    def measure(c):
        return replace(c, measure=False, mem_per_gpu_gb=float(next(measured))), ("measured",)

    monkeypatch.setattr("trainer.analysis.planner.cluster.resolve", measure)
    monkeypatch.setattr(auto.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("TRAINER_LAUNCH_ID", "launch-a")
    cluster = auto.cluster_config("cpu-local")
    assert auto.measured_once(cluster)[0].mem_per_gpu_gb == auto.measured_once(cluster)[0].mem_per_gpu_gb == 1.0
    monkeypatch.setenv("TRAINER_LAUNCH_ID", "launch-b")
    assert auto.measured_once(cluster)[0].mem_per_gpu_gb == 2.0


def _stated_machine(monkeypatch, launch: str):
    """cpu-local's measurement for one launch, given in advance (measuring costs a launch tens of seconds on a
    loaded machine): the localbench's stated estimates on 2 cores and 8 GB."""
    from trainer.analysis.planner import localbench as bench

    monkeypatch.setenv("TRAINER_LAUNCH_ID", launch)
    numbers = {"gpu": "CPU (2 cores)", "cpu_cores": 2, "mem_per_gpu_gb": 8.0, "mem_bw_gbs": 10.0, "measure": False}
    links = {"intra_node_bw_gbs": bench.ESTIMATE_BW_GBS, "intra_node_latency_us": bench.ESTIMATE_LATENCY_US}
    overheads = {f"{kind}_overhead": v for kind, v in bench.ESTIMATE_OVERHEADS.items()}
    peaks = {"peak_tflops_fp32": 0.05, "peak_tflops_bf16": 0.02, "inter_node_bw_gbs": 1.0}
    cluster = replace(auto.cluster_config("cpu-local"), **numbers, **links, **overheads, **peaks)
    path = auto.measurement_file("cpu-local")
    path.write_text(json.dumps({"cluster": asdict(cluster), "notes": ["stated by the test"]}))
    return path


@pytest.mark.slow
def test_auto_run_trains_the_chosen_layout(tmp_path, data_cache, monkeypatch):
    """One auto launch at world 2 and the explicit launch of what it chose: the same losses, and the choice
    printed and recorded in config.yaml and metrics.jsonl."""
    stated = _stated_machine(monkeypatch, f"test-auto-{tmp_path.name}")
    base = ["debug=smoke", *tiny_corpus_overrides(data_cache), "train.steps=4", "train.save_interval=-1"]
    proc = run_train(tmp_path / "auto", [*base, "parallel=auto"], ranks=2)
    stated.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("parallel=auto ("))
    print(f"\n{line}")
    assert "parallel=auto (throughput, cluster cpu-local, world 2): chose " in line
    p = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["parallel"]
    record = next(r for r in read_metrics(tmp_path / "auto") if "auto_chosen" in r)
    assert record["auto_chosen"] == p["chosen"] and record["auto_runner_up"] == p["runner_up"]
    assert p["chosen"]["name"] != p["runner_up"]["name"] and p["chosen"]["tokens_per_s"] > 0

    keys = ("tp", "pp", "zero_stage", "micro_batch", "recompute", "sequence_parallel", "global_batch")
    explicit = parallel_overrides(**{key: p[key] for key in keys})
    proc = run_train(tmp_path / "explicit", [*base, *explicit], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("auto", "explicit")]
    assert len(losses[0]) == 4
    deviation = max(abs(a - b) / abs(b) for a, b in zip(*losses))
    print(f"losses {losses[0]}, max relative deviation from the explicit run {deviation:.2e}")
    assert deviation < PARITY_RTOL, losses


def test_compare_chooses_an_auto_row_as_its_run_will(tmp_path):
    from trainer.analysis.compare.runner import Settings, check, parse_layout

    register()
    passthrough = ("model=gpt2-small", "parallel.cluster=h100-sxm")
    settings = Settings(8, 1, 2, 2, 64, 1, 60, "disabled", tmp_path, passthrough)
    layout = parse_layout("auto", 8)
    assert "parallel.auto=true" in settings.run_overrides(layout)
    outcome = check(layout, settings)
    assert outcome.status == "pending" and outcome.cfg.parallel.micro_batch == 2
    chosen = outcome.cfg.parallel
    assert (outcome.layout.tp, outcome.layout.pp, outcome.layout.zero) == (chosen.tp, chosen.pp, chosen.zero_stage)
    assert (
        outcome.cfg.parallel.chosen
        == resolve_parallel(_config("parallel.global_batch=64", "parallel.micro_batch=2"), 8).parallel.chosen
    )
    # "auto-memory" is the same row chosen by least memory, as `parallel=auto parallel.objective=memory` chooses
    memory = check(parse_layout("auto-memory", 8), settings)
    assert "parallel.objective=memory" in settings.run_overrides(parse_layout("auto-memory", 8))
    asked = _config("parallel.global_batch=64", "parallel.micro_batch=2", "parallel.objective=memory")
    assert memory.status == "pending" and memory.cfg.parallel.chosen == resolve_parallel(asked, 8).parallel.chosen
    assert memory.cfg.parallel.chosen != outcome.cfg.parallel.chosen
    with pytest.raises(BadInput, match="auto-throughput, auto-memory"):
        parse_layout("auto-speed", 8)
