"""Predicted milliseconds per optimizer step of each data-parallel synchronisation scheme (``parallel.dp_sync``) for
published model sizes on the planner's cluster links: the busiest link's bytes (trainer.analysis.formulas
.dp_sync_traffic, fp32 gradients or parameters) over its bandwidth, plus latency (costmodel.dp_sync_time).

    .venv/bin/python benchmarks/dp_sync_time.py [model ...]     (default: gpt2-small gpt3-1.3b llama3-8b)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from trainer.analysis.compare.sync import cluster_links
from trainer.analysis.planner.costmodel import dp_sync_time
from trainer.config.schema import ModelConfig
from trainer.model.shape import ModelShape

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = (("allreduce", "allreduce", 1), ("parameter_server", "parameter_server", 1))
SCHEMES += (("local_sgd / DiLoCo H=16", "local_sgd", 16), ("local_sgd / DiLoCo H=128", "local_sgd", 128))


def params(model: str) -> int:
    fields = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text())
    return ModelShape.from_config(ModelConfig(**fields)).params()


def main(models: list[str]) -> None:
    links = cluster_links()
    print("| model | Ψ | dp | scheme | " + " | ".join(f"ms/step {label}" for label in links) + " |")
    print("|" + "---|" * (4 + len(links)))
    for model in models:
        psi = params(model)
        for dp in (4, 32):
            for label, scheme, interval in SCHEMES:
                times = [dp_sync_time(scheme, 4 * psi, dp, 1 / interval, link) for link in links.values()]
                cells = " | ".join(f"{t * 1e3:,.1f}" for t in times)
                print(f"| {model} | {psi / 1e6:,.0f}M | {dp} | {label} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["gpt2-small", "gpt3-1.3b", "llama3-8b"])
