"""The one round loop behind the gRPC server: what used to drift between the network engine and the simulator.

- ε is accounted at the sampling rate each round really had (selected over the connected, eligible clients), not
  at the rate the configured number of clients would give;
- federated evaluation runs over the network: each client evaluates the new weights on its own held-out data and
  the server weighs their figures, as the simulator does.
"""

from __future__ import annotations

import pytest

from plait.federated.net.local import cluster, read_records, run_against_simulation, small_config, write_config
from plait.federated.privacy.accounting import epsilon_after


@pytest.mark.timeout(150)
def test_epsilon_follows_the_clients_actually_connected(tmp_path):
    # Prepare: 10 clients configured, 3 connected; C = 0.5 with a quorum of 3 selects all 3 every round (q = 1),
    # where the configured population would claim q = 5/10.
    z, delta = 1.0, 1e-5
    raw = small_config(tmp_path / "runs", num_clients=10, rounds=2, wait_for_clients=3)
    raw["fl"].update(fraction=0.5, min_clients=3, strategy={"name": "fedavg", "weighting": "uniform"},
                     privacy={"mode": "central", "clip_norm": 0.3, "noise_multiplier": z, "delta": delta,
                              "seeded_noise": True})
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    # Execute
    with cluster(path, tmp_path, run_dir, num_clients=3) as (server, _, clients):
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [c.wait(timeout=30) for c in clients] == [0, 0, 0]
    records = read_records(run_dir)
    # Assert: every round sampled all 3 connected clients, and ε is that of q = 1 (4.75 after one round at z = 1)
    assert [(r["connected"], r["selected"], r["participants"]) for r in records] == [(3, 3, 3)] * 2
    assert [r["dp_sample_rate"] for r in records] == [1.0, 1.0]
    assert [r["epsilon"] for r in records] == pytest.approx([epsilon_after(n, z, 1.0, delta) for n in (1, 2)])
    assert records[0]["epsilon"] > epsilon_after(1, z, 0.5, delta) + 0.5  # what the configured q understated


@pytest.mark.timeout(150)
def test_federated_evaluation_over_the_network_matches_simulation(tmp_path):
    # Prepare: every client holds out 10% of its data; federated evaluation after every round.
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=2)
    raw["data"]["eval_fraction"] = 0.1
    raw["fl"].update(federated_eval_every=1)
    # Execute
    run = run_against_simulation(raw, tmp_path, 3)
    # Assert: the weighted held-out figures of the same weights on the same clients' data
    assert run.server_code == 0, run.log("server.log")
    assert run.client_codes == [0, 0, 0], [run.log(f"client{c}.log") for c in range(3)]
    assert [r["fed_clients"] for r in run.records] == [r["fed_clients"] for r in run.ref_records] == [3, 3]
    for net, sim in zip(run.records, run.ref_records):
        assert net["fed_accuracy"] == pytest.approx(sim["fed_accuracy"], abs=1e-4)
        assert net["fed_loss"] == pytest.approx(sim["fed_loss"], rel=1e-4)
    assert "evaluated on" in run.log("client0.log")
