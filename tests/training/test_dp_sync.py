"""parallel.dp_sync at dp 4: the synchronous schemes follow all-reduce's losses within 1e-5 relative over 10
steps, and every scheme's measured bytes equal the analytic count (trainer.analysis.formulas.dp_sync_traffic).

Local SGD at H = 1 averages the replicas' parameters after each replica stepped on its own gradient; that is
a step on the averaged gradient only for an optimizer linear in the gradient. The runs therefore use AdamW
with ε ≫ √v̂, where its step lr/ε·m̂ is momentum SGD, and no weight decay or clipping (clipping is per
replica; without it DeepSpeed's 4-byte all-reduce of the gradient norm is gone too, so the bytes are the
scheme's alone). The parameter server is exact for any optimizer; it runs with the same settings to share the
reference. The global batch of 8 is 2 accumulated micro-batches of 1 per rank.
"""

from __future__ import annotations

import pytest

from conftest import PARITY_RTOL, read_metrics, run_train, tiny_corpus_overrides
from trainer.analysis.compare.sync import link_bytes_of
from trainer.analysis.formulas import dp_sync_traffic

STEPS = 10
RANKS = 4
LINEAR = ["optim.eps=1e8", "optim.lr=1e7", "optim.min_lr=0", "optim.weight_decay=0", "optim.grad_clip=0"]
SCHEMES = {
    "allreduce": [],
    "parameter_server": ["parallel.dp_sync=parameter_server"],
    "local_sgd": ["parallel.dp_sync=local_sgd", "parallel.sync_interval=1"],
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory, data_cache) -> dict[str, list[dict]]:
    """Each scheme's logged steps (every step is logged)."""
    out = {}
    for name, extra in SCHEMES.items():
        run_dir = tmp_path_factory.mktemp(name)
        overrides = ["debug=smoke", *tiny_corpus_overrides(data_cache), "parallel=dp", f"train.steps={STEPS}"]
        overrides += ["parallel.micro_batch=1", "parallel.global_batch=8", "train.save_interval=-1", *LINEAR, *extra]
        proc = run_train(run_dir, overrides, ranks=RANKS)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = [r for r in read_metrics(run_dir) if "loss" in r]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["parameter_server", "local_sgd"])
def test_synchronous_scheme_follows_allreduce(scheme, steps):
    reference, losses = [r["loss"] for r in steps["allreduce"]], [r["loss"] for r in steps[scheme]]
    assert len(losses) == len(reference) == STEPS
    deviation = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"\n| {scheme} | {losses[-1]:.6f} | {deviation:.2e} |")
    assert deviation < PARITY_RTOL, (losses, reference)
    assert losses[-1] < losses[0]
    if scheme == "parameter_server":  # every replica steps on the same, synchronised gradient
        norms = [(r["grad_norm"], a["grad_norm"]) for r, a in zip(steps[scheme], steps["allreduce"])]
        assert all(abs(g / h - 1) < PARITY_RTOL for g, h in norms), norms


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_measured_bytes_equal_the_analytic_count(scheme, steps):
    for record in steps[scheme]:
        psi_bytes = 4 * record["ranks"][0]["shard_params"]
        traffic = dp_sync_traffic(scheme, psi_bytes, RANKS)  # H = 1: local SGD syncs every step
        links = [link_bytes_of(rank, RANKS) for rank in record["ranks"]]
        assert min(sent for sent, _ in links) == traffic.rank  # a worker's (every rank's, on a ring)
        assert max(max(link) for link in links) == traffic.busiest_link
