"""The relative cap on the weight a client claims (issue 14): at most `fl.bounds.examples_factor` times the median
count the round's cohort declared before training, so that a client claiming 10^7 examples (within the absolute cap)
among clients of 600 no longer owns FedAvg's weighted mean; the cap is fixed before any update arrives, so the
aggregate does not depend on their order; each capped weight is counted in the round's record."""

from __future__ import annotations

import json

import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.bounds import BoundedAggregator, BoundsConfig, examples_cap
from plait.federated.client_update import Update
from plait.federated.config import FederatedRunConfig
from plait.federated.net.connection import Connection, Task
from plait.federated.net.local import cluster, read_records, small_config, write_config
from plait.federated.strategy import FedAvgAggregator
from plait.settings.config import from_dict
from tests_support import shapes_config

NO_HISTORY = torch.zeros(0, dtype=torch.float64)
DECLARED = {0: 600, 1: 600, 2: 300, 3: 2**62}  # lower median 600: the liar weighs at most 2 × 600


def _deltas() -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {cid: torch.randn(1000, generator=generator) for cid in DECLARED}


def test_one_huge_claim_weighs_at_most_the_factor_times_the_cohort_median():
    deltas = _deltas()
    bounded = BoundedAggregator(FedAvgAggregator(1000), BoundsConfig(), NO_HISTORY, DECLARED)
    for cid, delta in deltas.items():
        bounded.add(cid, Update(delta, DECLARED[cid]))
    weights = {0: 600, 1: 600, 2: 300, 3: 1200}
    expected = sum(weights[c] * deltas[c].double() for c in deltas) / sum(weights.values())
    torch.testing.assert_close(bounded.result(), expected.float(), rtol=0, atol=1e-7)
    assert bounded.capped == {"examples": 1, "norm": 0}


def test_the_capped_aggregate_does_not_depend_on_arrival_order():
    deltas = _deltas()
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1]):
        bounded = BoundedAggregator(FedAvgAggregator(1000), BoundsConfig(), NO_HISTORY, DECLARED)
        for cid in order:
            bounded.add(cid, Update(deltas[cid], DECLARED[cid]))
        results.append(bounded.result())
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_the_cap_follows_its_settings():
    assert examples_cap(BoundsConfig(), {0: 600, 1: 10**7}) == 1200        # even cohort: the lower median
    assert examples_cap(BoundsConfig(examples_factor=10), {0: 50, 1: 70, 2: 60}) == 600
    assert examples_cap(BoundsConfig(max_examples=1000), {0: 600, 1: 600}) == 1000  # the absolute cap is lower
    assert examples_cap(BoundsConfig(examples_factor=0), {0: 600}) == 10**7         # off: the absolute cap alone
    assert examples_cap(BoundsConfig(examples_factor=0, max_examples=0), {0: 1}) == float("inf")
    assert examples_cap(BoundsConfig(), {0: 0, 1: 0, 2: 5}) == 1             # an honest round keeps some weight
    with pytest.raises(ValueError, match="fl.bounds.examples_factor"):
        BoundsConfig(examples_factor=0.5)


def test_a_simulated_huge_count_attack_is_capped_and_counted(tmp_path):
    raw = shapes_config(tmp_path, name="huge_count", fraction=1.0, attack={"kind": "huge_count", "fraction": 0.34})
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["capped_examples"] for r in records] == [r["attackers"] for r in records] == [2, 2]


@pytest.mark.timeout(150)
def test_a_client_declaring_a_huge_count_is_capped_over_the_network(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=2, heartbeat_timeout_s=10.0)
    raw["fl"]["fraction"] = 1.0
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    with cluster(path, tmp_path, run_dir, num_clients=2) as (server, info, clients):
        rogue = Connection(f"127.0.0.1:{info['port']}", 2, None)
        # within fl.bounds.max_examples (10^7), and reported as declared: only the relative cap stops it
        session = rogue.register({"charging": True, "idle": True, "unmetered": True}, 10**7).session
        done = 0
        for _ in range(120):
            got = rogue.get_task(session, 2.0, 199_210)
            if isinstance(got, Task) and got.round > done:
                rogue.push_update(session, got, torch.zeros(got.params.numel()), 10**7, 1.0)
                done = got.round
            if done == 2:
                break
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [c.wait(timeout=30) for c in clients] == [0, 0]
        rogue.close()
    records = read_records(run_dir)
    assert [(r["participants"], r.get("refused"), r["capped_examples"]) for r in records] == [(3, 0, 1)] * 2
