"""With 20% sign-flip attackers a robust rule keeps MNIST accuracy within 2 points of the clean run; FedAvg does not.

Slow (three 15-round MNIST runs, a few minutes on 2 cores): runs in CI's slow job, `pytest -m slow`.
"""

import pytest

from plait.federated.config import FederatedRunConfig
from plait.federated.simulation import build_server
from plait.settings.config import from_dict


def _final_accuracy(strategy: dict, attack: str, rounds: int = 15) -> float:
    config = from_dict(FederatedRunConfig, {
        "run": {"name": "t", "seed": 0, "threads": 1}, "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": 100, "partition": "iid"},
        "fl": {"rounds": rounds, "fraction": 0.2, "min_clients": 10, "eval_every": 0,
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.1}, "strategy": strategy,
               "attack": {"kind": attack, "fraction": 0.2, "scale": 4.0}}})
    server = build_server(config)
    state = server.initial_state()
    for _ in range(rounds):
        state, record = server.run_round(state)
    return record["test_accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multi_krum_survives_sign_flip_where_fedavg_fails():
    clean = _final_accuracy({"name": "fedavg"}, "none")
    attacked_fedavg = _final_accuracy({"name": "fedavg"}, "sign_flip")
    attacked_robust = _final_accuracy({"name": "multi_krum", "byzantine_fraction": 0.3}, "sign_flip")
    assert clean > 0.9
    assert clean - attacked_robust <= 0.02
    assert clean - attacked_fedavg > 0.02
