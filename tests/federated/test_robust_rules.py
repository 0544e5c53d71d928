"""Robust aggregation rules against hand-computed values, and the strategies that use them."""

import pytest
import torch

from plait.core import robust
from plait.federated.attacks import AttackConfig, attacker_ids, flip_labels, poison_count, poison_delta
from plait.federated.bounds import BoundedAggregator, BoundsConfig, UpdateRefused
from plait.federated.client_update import Update
from plait.federated.strategy import StrategyConfig, make_aggregator

# 5 clients, 2 coordinates; client 4 is an outlier
UPDATES = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -500.0]])


def test_coordinate_median_odd_and_even():
    assert robust.coordinate_median(UPDATES).tolist() == [3.0, 20.0]
    assert robust.coordinate_median(UPDATES[:4]).tolist() == [2.5, 25.0]  # mean of the two middle values


def test_trimmed_mean():
    # coordinate 0 sorted 1,2,3,4,100 → drop 1 and 100 → mean(2,3,4) = 3
    # coordinate 1 sorted -500,10,20,30,40 → drop -500 and 40 → mean(10,20,30) = 20
    assert robust.trimmed_mean(UPDATES, 1).tolist() == [3.0, 20.0]
    assert torch.allclose(robust.trimmed_mean(UPDATES, 0), UPDATES.mean(0))
    with pytest.raises(ValueError, match="cannot trim"):
        robust.trimmed_mean(UPDATES, 3)


def test_krum_scores_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    # f = 1 → n − f − 2 = 1 nearest neighbour: squared distances to the closest other point
    assert robust.krum_scores(x, 1).tolist() == [1.0, 1.0, 4.0, 49.0]
    # f = 0 → 2 neighbours: 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 49+81=130
    assert robust.krum_scores(x, 0).tolist() == [10.0, 5.0, 13.0, 130.0]
    assert robust.krum(x, 0).tolist() == [1.0]
    assert robust.multi_krum(x, 0, 2).tolist() == [0.5]  # the two best: points 1 and 0
    with pytest.raises(ValueError, match="num_byzantine"):
        robust.krum(x, 2)


def test_krum_rejects_the_outlier():
    chosen = robust.krum(UPDATES, 1)
    assert chosen.tolist() in UPDATES[:4].tolist()
    assert robust.multi_krum(UPDATES, 1, 4).tolist() == [2.5, 25.0]


@pytest.mark.parametrize("name,expected", [("median", [3.0, 20.0]), ("trimmed_mean", [3.0, 20.0]),
                                           ("multi_krum", [2.5, 25.0])])
def test_robust_strategies(name, expected):
    config = StrategyConfig(name=name, trim_fraction=0.2, byzantine_fraction=0.2)
    aggregator = make_aggregator(config, 2)
    for cid, row in enumerate(UPDATES):
        aggregator.add(cid, Update(row.clone(), num_examples=1000 if cid == 4 else 1))  # weights are ignored
    assert aggregator.result().tolist() == expected


def test_fedavg_strategy_is_unchanged():
    aggregator = make_aggregator(StrategyConfig(), 2)
    aggregator.add(0, Update(torch.tensor([1.0, 0.0]), 1))
    aggregator.add(1, Update(torch.tensor([4.0, 3.0]), 2))
    assert aggregator.result().tolist() == [3.0, 2.0]


def test_attackers_are_a_seeded_fixed_fraction():
    ids = attacker_ids(AttackConfig(kind="sign_flip", fraction=0.2, seed=1), 50)
    assert len(ids) == 10 and ids == attacker_ids(AttackConfig(kind="sign_flip", fraction=0.2, seed=1), 50)
    assert attacker_ids(AttackConfig(kind="none"), 50) == frozenset()


def test_poisoning():
    delta = torch.tensor([1.0, -2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    assert poison_delta("sign_flip", delta, 4.0, g).tolist() == [-4.0, 8.0, -12.0]
    noise = poison_delta("scaled_noise", torch.ones(20000), 3.0, g)
    assert abs(float(noise.std()) - 3.0) < 0.1
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


def _honest() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.ones(4) + 0.1 * torch.randn(4, generator=g) for _ in range(10)]


def _attacked_round(rule: str, attack: str, bounds: BoundsConfig) -> torch.Tensor:
    """10 honest clients (deltas near 1, 600 examples each) and 2 attackers, through the bounds and the rule."""
    aggregator = BoundedAggregator(make_aggregator(StrategyConfig(name=rule, trim_fraction=0.2,
                                                                  byzantine_fraction=0.2), 4),
                                   bounds, torch.zeros(0, dtype=torch.float64))
    honest = _honest()
    for cid, delta in enumerate(honest):
        aggregator.add(cid, Update(delta, 600))
    for cid in (10, 11):
        try:
            aggregator.add(cid, Update(poison_delta(attack, honest[0], 4.0, torch.Generator()),
                                       poison_count(attack, 600)))
        except UpdateRefused:
            pass
    return aggregator.result()


UNBOUNDED = BoundsConfig(max_norm=0, norm_factor=0, max_examples=0)


@pytest.mark.parametrize("attack", ["huge_update", "huge_count"])
def test_unchecked_fedavg_is_owned_by_one_huge_update_or_count(attack):
    result = _attacked_round("fedavg", attack, UNBOUNDED)
    if attack == "huge_update":
        assert (result.abs() > 1e37).all()  # 2 × 600 × 3e38 / 7200: the next forward pass overflows
    else:
        assert torch.allclose(result, -4 * _honest()[0], rtol=1e-4)  # 2^62 examples against 6000


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "krum", "multi_krum"])
@pytest.mark.parametrize("attack", ["huge_update", "huge_count"])
def test_bounds_and_robust_rules_hold_against_huge_attacks(rule, attack):
    """Behind the bounds a huge update is refused by its norm and a huge count is capped at max_examples (FedAvg:
    the capped weighted mean, by hand); a robust rule also stays near the honest mean (1) without the bounds."""
    bounds = BoundsConfig(max_examples=1000)  # about what a client of this deployment holds
    result = _attacked_round(rule, attack, bounds)
    honest = _honest()
    if rule == "fedavg":
        expected = sum(honest) / 10 if attack == "huge_update" else \
            (600 * sum(honest) + 2 * 1000 * (-4 * honest[0])) / (6000 + 2000)
        assert torch.allclose(result, expected, atol=1e-5)
    else:
        assert torch.allclose(result, torch.ones(4), atol=0.3)
        assert torch.allclose(_attacked_round(rule, attack, UNBOUNDED), torch.ones(4), atol=0.3)
