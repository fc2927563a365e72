"""The metrics.jsonl record: one typed schema for the trainer, the baseline and the report, and the README
lists every field of it."""

from __future__ import annotations

import json
import re

from conftest import ROOT
from trainer.training.record import PIPE_FIELDS, Comm, EvalRecord, RankRecord, StepRecord, is_logged, jsonl_fields


def _rank(rank: int) -> RankRecord:
    return RankRecord(rank, {"tp": 0, "pp": 0, "dp": rank}, [0, 7], 10, 1, 1, 12.5, {"params": 4}, {"data_s": 0.1})


def _step(pipe: dict) -> StepRecord:
    tp = Comm({"all_reduce": {"count": 2, "bytes": 8, "seconds": 0.1}}, 8, 6.0, 0.1)
    speed = dict(step_time_s=1.0, tokens_per_s=2.0, window_tokens_per_s=2.0, window_tokens_per_cpu_s=1.0)
    speed.update(tflops_per_rank=0.1, mfu=0.2, peak_mem_mb=3.0)
    return StepRecord(3, 1.5, 1e-3, None, 0, ranks=[_rank(0), _rank(1)], tp_comm=tp, pipe=pipe, **speed)


def test_records_serialise_to_the_documented_keys():
    pipe = dict.fromkeys(PIPE_FIELDS, 0.5)
    fields = jsonl_fields()
    record = json.loads(json.dumps(_step(pipe).to_dict()))  # JSON-safe
    assert set(record) | {"time_s"} == set(fields["step"])  # time_s is added when the log writes it
    assert set(record["ranks"][0]) == set(fields["rank"]) and record["ranks"][1]["coords"]["dp"] == 1
    assert record["tp_comm_wire_bytes"] == 6.0 and record["ds_comm_bytes"] == 0
    assert set(_step({}).to_dict()) == set(fields["step"]) - {"time_s"} - set(pipe)  # no bubble without a pipeline
    assert set(EvalRecord(3, 2.0, 7.4).to_dict()) == set(fields["eval"])


def test_readme_lists_every_metrics_field():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What a run writes") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    missing = [f for kind in jsonl_fields().values() for f in kind if f not in documented]
    assert missing == [], f"README's 'What a run writes' lacks {missing}"


def test_the_logging_rule():
    """Every log_interval-th step, the first of a run (also after a resume) and the last."""
    assert [s for s in range(10) if is_logged(s, 0, 4, 10)] == [0, 3, 7, 9]
    assert [s for s in range(5, 10) if is_logged(s, 5, 4, 10)] == [5, 7, 9]
