"""README.md lists every key of the typed config schema, so the documentation cannot fall behind it.

The keys are walked from the dataclasses themselves (``trainer.config.schema.Config`` recursively), not
from a list kept here: a field added to the schema fails this test until README.md documents it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from trainer.analysis.planner.config import PlanConfig
from trainer.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]

# Keys deliberately left out of the documentation, each with its reason.
UNDOCUMENTED: set[str] = set()  # schema keys that are not user-facing options (none today)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every non-dataclass field under the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += leaf_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _missing(keys: list[str], text: str) -> list[str]:
    return [k for k in keys if f"`{k}`" not in text]


def test_walk_reaches_nested_sections():
    keys = leaf_keys(Config)
    for key in ("parallel.recompute", "data.tokenizer.vocab_size", "logging.wandb.mode", "logging.progress"):
        assert key in keys
    assert "data.tokenizer" not in keys and "logging.wandb" not in keys  # sections are walked, not listed


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    keys = [k for k in leaf_keys(Config) if k not in UNDOCUMENTED]
    assert _missing(keys, readme) == [], "README.md's Configuration reference lacks these schema keys"


def test_undocumented_keys_still_exist():
    """An exclusion for a field that is gone must go too."""
    assert UNDOCUMENTED <= set(leaf_keys(Config))


def test_readme_documents_every_compare_key():
    readme = (ROOT / "README.md").read_text()
    compare = yaml.safe_load((ROOT / "conf" / "compare.yaml").read_text())["compare"]
    assert _missing([f"compare.{k}" for k in compare], readme) == []


def test_planner_doc_documents_every_cluster_and_plan_key():
    doc = (ROOT / "docs" / "planner.md").read_text()
    # model.* is the trainer's ModelConfig, documented in README.md (checked above); parallel.* and
    # train.* here are the planner's global_batch / precision, documented in docs/planner.md's table.
    keys = [k for k in leaf_keys(PlanConfig) if not k.startswith("model.")]
    assert _missing(keys, doc) == []


def test_readme_code_layout_lists_every_package_folder():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Code layout") :]
    folders = sorted(p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "trainer").rglob("__init__.py"))
    assert [f for f in folders if f"\n{f} " not in layout] == []
