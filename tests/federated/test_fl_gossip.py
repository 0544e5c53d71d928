"""Decentralised FL: graphs, mixing, and equivalence with FedAvg on the complete graph."""

import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.simulation import build_server
from plait.federated.topology import mixing_matrix, neighbours
from plait.settings.config import from_dict


@pytest.mark.parametrize("topology, nodes, degree", [("ring", 7, 0), ("torus", 16, 0), ("random_regular", 12, 3),
                                                     ("complete", 5, 0)])
def test_mixing_matrix_is_symmetric_doubly_stochastic_on_the_graph(topology, nodes, degree):
    adj = neighbours(topology, nodes, degree, seed=0)
    weights = mixing_matrix(adj)
    assert torch.allclose(weights, weights.T)
    ones = torch.ones(nodes, dtype=torch.float64)
    assert torch.allclose(weights.sum(0), ones) and torch.allclose(weights.sum(1), ones)
    assert (weights >= 0).all()
    off_graph = [(i, j) for i in range(nodes) for j in range(nodes) if i != j and j not in adj[i]]
    assert all(weights[i, j] == 0 for i, j in off_graph)
    expected_degree = {"ring": 2, "torus": 4, "random_regular": 3, "complete": nodes - 1}[topology]
    assert all(len(a) == expected_degree for a in adj)


def test_ring_weights_by_hand():
    # 4-ring: degree 2 everywhere → neighbours weigh 1/3, self keeps 1/3
    weights = mixing_matrix(neighbours("ring", 4, 0, seed=0))
    assert torch.allclose(weights[0], torch.tensor([1 / 3, 1 / 3, 0, 1 / 3], dtype=torch.float64))


def test_bad_graphs_are_named():
    with pytest.raises(ValueError, match="torus"):
        neighbours("torus", 10, 0, seed=0)
    with pytest.raises(ValueError, match="fl.gossip.degree"):
        neighbours("random_regular", 5, 3, seed=0)


def _config(tmp_path, **gossip):
    return from_dict(FederatedRunConfig, {
        "run": {"name": "g", "root": str(tmp_path), "seed": 2},
        "data": {"num_clients": 6, "partition": "iid"},
        "fl": {"rounds": 2, "fraction": 1.0, "min_clients": 1, "eval_every": 0,
               "strategy": {"weighting": "uniform"}, "plan": {"max_steps": 3, "lr": 0.05}, "gossip": gossip}})


def test_complete_graph_with_everyone_training_is_fedavg(tmp_path):
    # Prepare: the same config server-based (uniform FedAvg, every client every round) and gossip on K_6, both with
    # the learning rate halved each round
    fedavg, gossip = _config(tmp_path), _config(tmp_path, topology="complete")
    fedavg.fl.lr_decay = gossip.fl.lr_decay = 0.5
    fedavg, gossip = build_server(fedavg), build_server(gossip)
    # Execute: two rounds each
    a, b = fedavg.initial_state(), gossip.initial_state()
    for _ in range(2):
        a, _ = fedavg.run_round(a)
        b, record = gossip.run_round(b)
    # Assert: every node holds the FedAvg model (complete graph: one mixing step is the exact mean)
    assert torch.allclose(b.params, a.params.expand_as(b.params), atol=1e-5)
    assert record["consensus_distance"] < 1e-9 and record["participants"] == 6
    assert record["lr"] == pytest.approx(0.05 * 0.5)  # round 2's


def test_gossip_preserves_the_average_and_moves_towards_consensus(tmp_path):
    runner = build_server(_config(tmp_path, topology="ring", gossip_steps=1))
    state = runner.initial_state()
    state.params = state.params + torch.randn(state.params.shape, generator=torch.Generator().manual_seed(0))
    before = state.params.clone()
    mixed = runner.mixing.to(before.dtype) @ before
    assert torch.allclose(mixed.mean(0), before.mean(0), atol=1e-6)
    def spread(x):
        return (x - x.mean(0)).pow(2).sum()
    assert spread(mixed) < spread(before)


def test_gossip_run_writes_metrics_and_learns(tmp_path):
    config = _config(tmp_path, topology="ring", gossip_steps=2)
    config.fl.rounds = 4
    summary = run_federated(config, show_progress=False)
    assert summary.rounds == 4 and summary.final["test_accuracy"] > 0.5
    assert summary.final["bytes_up"] == 2 * 6 * 199_210 * 4 * 2  # 6 ring edges, both ways, 2 steps
    assert "node_accuracy_mean" in summary.final


def test_server_side_settings_are_refused_without_a_server(tmp_path):
    with pytest.raises(ValueError, match="fl.privacy.mode"):
        from_dict(FederatedRunConfig, {"fl": {"gossip": {"topology": "ring"}, "privacy": {"mode": "local"}}})
