"""`SecureAggregator` behind the strategy's Aggregator interface: its weighted mean equals FedAvg's, for real
local-training updates, with stragglers that were selected but never reported."""

import pytest
import torch

from plait.core.flat import flat_params
from plait.federated.client_update import ClientData, Update, client_update
from plait.federated.plan import TrainingPlan
from plait.federated.secagg import SecAggConfig, SecAggError, SecureAggregator
from plait.federated.strategy import FedAvgAggregator


def _trained_updates(num_clients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    params, spec = flat_params(model)
    gen = torch.Generator().manual_seed(1)
    updates = {}
    for cid in range(num_clients):
        n = int(torch.randint(5, 40, (), generator=gen))   # quantity skew: FedAvg weights differ
        data = ClientData(torch.randn(n, 12, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        updates[cid] = client_update(model, spec, params, data, TrainingPlan(lr=0.1, batch_size=5, seed=cid))
    return params.numel(), updates


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_weighted_mean_through_secagg_equals_fedavg(weighting):
    # Prepare: 10 clients trained locally; 2 selected clients straggle and never report
    dim, updates = _trained_updates(10)
    reported = [c for c in updates if c not in (3, 8)]
    fedavg = FedAvgAggregator(dim, weighting)
    secure = SecureAggregator(dim, SecAggConfig(), weighting=weighting, seed=5, round_id=2)
    # Execute
    secure.begin(updates)                     # all 10 selected: key stages run before training
    for cid in reported:
        fedavg.add(cid, updates[cid])
        secure.add(cid, updates[cid])
    expected, got = fedavg.result(), secure.result()
    # Assert: same mean within the fixed-point step (0.5 / scale per weighted value, divided by the total weight)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 0.5 / SecAggConfig().scale + 1e-6
    assert secure.outcome.dropped == (3, 8)
    weights = [updates[c].num_examples if weighting == "examples" else 1 for c in reported]
    assert secure.outcome.total_weight == sum(weights)


def test_traffic_is_counted_per_client_and_dominated_by_the_masked_vector():
    dim, updates = _trained_updates(6)
    secure = SecureAggregator(dim, SecAggConfig(), wire=True)
    secure.begin(updates)
    for cid, update in updates.items():
        secure.add(cid, update)
    secure.result()
    traffic = secure.traffic()
    bits = secure.server.state.bits
    masked_bytes = -(-(dim + 1) * bits // 8)
    assert set(traffic["per_client_up"]) == set(range(6))
    for up in traffic["per_client_up"].values():
        assert masked_bytes < up < masked_bytes + 2000     # + keys, 5 encrypted shares, 6 unmask shares
    assert sum(traffic["per_client_up"].values()) == traffic["bytes_up"]


def test_aggregator_errors_name_client_and_stage():
    dim, updates = _trained_updates(3)
    secure = SecureAggregator(dim, SecAggConfig(max_weight=100))
    with pytest.raises(SecAggError, match="before begin"):
        secure.add(0, updates[0])
    secure.begin([0, 1, 2])
    with pytest.raises(SecAggError, match="client 7 was not selected"):
        secure.add(7, updates[0])
    with pytest.raises(SecAggError, match=r"client 0: weight \d+ must be an integer in \[1, secagg.max_weight = 100\]"):
        secure.add(0, Update(updates[0].delta, 101))
    with pytest.raises(SecAggError, match="client 1: update has 4 values"):
        secure.add(1, Update(torch.zeros(4), 1))
    secure.add(1, updates[1])
    with pytest.raises(SecAggError, match="client 1: masked input in stage UNMASK"):
        secure.add(1, updates[1])
    with pytest.raises(ValueError, match="strategy.weighting"):
        SecureAggregator(dim, SecAggConfig(), weighting="median")
