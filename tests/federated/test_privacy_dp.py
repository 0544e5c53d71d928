"""Differential privacy: clipping, noise scale, fixed denominator, adaptive clipping, accounting, budget stop,
and the membership-inference audit."""

import math
import warnings

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from torch import nn

from plait.data.federated import FederatedData
from plait.federated.client_update import Update
from plait.federated.config import FLConfig
from plait.federated.executor import SequentialExecutor
from plait.federated.privacy import CentralDPAggregator, LocalDP, PrivacyConfig, epsilon_after, update_clip_norm
from plait.federated.privacy.accounting import epsilon_of_rates, rounds_within_budget
from plait.federated.privacy.audit import loss_threshold_attack
from plait.federated.privacy.central import delta_noise_multiplier
from plait.federated.server import FederatedServer
from plait.federated.strategy import FedAvgAggregator
from plait.settings.config import ConfigError, from_dict


def _central(dim, clip=1.0, z=0.0, expected=5, seed=0, count_std=None):
    inner = FedAvgAggregator(dim, "uniform")
    return CentralDPAggregator(inner, clip, z, expected, torch.Generator().manual_seed(seed), count_std)


def test_clipping_and_fixed_denominator_without_noise():
    agg = _central(2, clip=1.0, z=0.0, expected=5)
    agg.add(0, Update(torch.tensor([3.0, 4.0]), 10))   # norm 5 → clipped to [0.6, 0.8]
    agg.add(1, Update(torch.tensor([0.5, 0.0]), 99))   # inside the ball, kept; weight ignored
    agg.add(2, Update(torch.tensor([0.0, -0.2]), 1))
    # sum of clipped = [1.1, 0.6]; fixed denominator 5 although only 3 reported
    assert torch.allclose(agg.result(), torch.tensor([1.1, 0.6]) / 5)
    assert agg.unclipped_fraction == pytest.approx(2 / 3)


def test_central_noise_has_the_configured_scale():
    dim, clip, z, expected = 40000, 0.5, 1.3, 4
    agg = _central(dim, clip, z, expected, seed=1)
    for cid in range(expected):
        agg.add(cid, Update(torch.zeros(dim), 1))
    noise = agg.result() * expected  # back to the noise on the sum: N(0, (z·C)²)
    # the sample std of 40000 normals is within 2% of the true std with overwhelming probability (its sd is 0.35%)
    assert abs(float(noise.std()) / (z * clip) - 1) < 0.02
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(dim)


def test_local_dp_noise_scale_and_clip():
    local = LocalDP(clip_norm=2.0, noise_multiplier=0.7)
    out = local(torch.full((40000,), 10.0), torch.Generator().manual_seed(2))
    clipped = torch.full((40000,), 2.0 / math.sqrt(40000))
    assert abs(float((out - clipped).std()) / 1.4 - 1) < 0.02


def test_adaptive_clip_update_by_hand():
    # 3 of 4 unclipped, no count noise, gamma 0.5, eta 0.2: C · exp(−0.2 · 0.25)
    assert update_clip_norm(1.0, 3, 4, 0.5, 0.2, 0.0) == pytest.approx(math.exp(-0.05))
    # Andrew et al.: z_Δ = (z^-2 − (2σ_b)^-2)^-1/2
    assert delta_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        delta_noise_multiplier(1.0, 0.4)
    agg = _central(2, clip=1.0, z=0.0, expected=2, count_std=None)
    agg.add(0, Update(torch.tensor([0.1, 0.0]), 1))
    agg.add(1, Update(torch.tensor([9.0, 0.0]), 1))
    agg.result()
    assert agg.next_clip_norm(0.5, 0.2) == pytest.approx(1.0)  # b̄ = 0.5 = γ: C stays


def test_epsilon_matches_dp_accounting():
    q, z, rounds, delta = 0.1, 1.1, 50, 1e-5
    accountant = rdp.RdpAccountant()  # dp-accounting's default orders
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    reference = accountant.get_epsilon(delta)
    assert epsilon_after(rounds, z, q, delta) == pytest.approx(reference, rel=0.02)


def test_epsilon_of_the_gaussian_mechanism_by_hand():
    # one unsampled Gaussian round: RDP(α) = α / (2 z²); dp-accounting converts with
    # ε = RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1), minimised over the orders
    z, delta = 2.0, 1e-5
    orders = np.array(list(range(2, 64)) + [80, 96, 128, 192, 256, 512, 1024], dtype=float)
    by_hand = np.min(orders / (2 * z * z) + np.log((orders - 1) / orders)
                     - (np.log(delta) + np.log(orders)) / (orders - 1))
    assert epsilon_after(1, z, 1.0, delta) == pytest.approx(by_hand, rel=1e-6)
    # ε grows with rounds and shrinks with noise
    assert epsilon_after(10, z, 0.1, delta) < epsilon_after(20, z, 0.1, delta)
    assert epsilon_after(10, 2 * z, 0.1, delta) < epsilon_after(10, z, 0.1, delta)
    assert epsilon_after(0, z, 0.1, delta) == 0.0 and epsilon_after(3, 0.0, 0.1, delta) == math.inf


def test_rounds_within_budget():
    r = rounds_within_budget(2.0, 1.0, 0.2, 1e-5, 1000)
    assert epsilon_after(r, 1.0, 0.2, 1e-5) <= 2.0 < epsilon_after(r + 1, 1.0, 0.2, 1e-5)


def _tiny_server(privacy: dict, rounds=10, strategy=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    parts = [np.arange(i * 20, (i + 1) * 20) for i in range(10)]
    data = FederatedData(x, y, x[:50], y[:50], parts, 0.0, 0, num_classes=2)
    config = from_dict(FLConfig, {"rounds": rounds, "fraction": 0.3, "min_clients": 1,
                                  "strategy": strategy or {"weighting": "uniform"},
                                  "plan": {"batch_size": 0, "lr": 0.5}, "privacy": privacy})
    torch.manual_seed(0)
    return FederatedServer(config, nn.Linear(4, 2), data, SequentialExecutor(), seed=0)


def test_budget_stop_in_the_round_loop():
    server = _tiny_server({"mode": "central", "noise_multiplier": 2.0, "clip_norm": 0.5, "epsilon_budget": 2.0})
    allowed = rounds_within_budget(2.0, 2.0, 0.3, 1e-5, 100)
    assert 2 <= allowed < 8
    state = server.initial_state()
    records = []
    for _ in range(allowed + 2):
        before = state.params.clone()
        state, record = server.run_round(state)
        records.append((record, before, state.params))
    for record, _, _ in records[:allowed]:
        assert not record.get("stop") and record["participants"] == 3 and record["epsilon"] <= 2.0
    for record, before, after in records[allowed:]:
        assert record["stop"] and record["participants"] == 0 and torch.equal(before, after)
        assert record["epsilon"] == records[allowed - 1][0]["epsilon"]  # no more spending


def test_adaptive_clipping_moves_the_norm_and_is_checkpointed():
    server = _tiny_server({"mode": "central", "noise_multiplier": 0.5, "clip_norm": 100.0, "adaptive": True,
                           "clipped_count_stddev": 1.0, "seeded_noise": True})
    state = server.initial_state()
    for _ in range(3):
        state, record = server.run_round(state)
    # every update is far inside 100, so b̄ ≈ 1 > γ and C shrinks each round
    assert float(state.opt_state["dp_clip_norm"]) < 100.0 * math.exp(-0.2 * 0.2)
    assert record["dp_clip_norm"] < 100.0


def test_an_expected_client_count_no_round_reaches_is_refused_and_one_far_from_the_target_said():
    # 10 clients, 3 a round: the fixed denominator divides each round's noised sum
    with pytest.raises(ValueError, match=r"expected_clients = 11 is more than the 10 clients there are"):
        _tiny_server({"mode": "central", "expected_clients": 11})
    with pytest.warns(UserWarning, match=r"expected_clients = 9 is far from the rounds' target of 3 clients: .* "
                                         r"scales its mean by about 0.33x"):
        _tiny_server({"mode": "central", "expected_clients": 9})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 2x of the target: nothing said
        for expected in (2, 3, 6):
            _tiny_server({"mode": "central", "expected_clients": expected})


def test_local_dp_run_reports_epsilon():
    server = _tiny_server({"mode": "local", "noise_multiplier": 2.0, "clip_norm": 1.0})
    state, record = server.run_round(server.initial_state())
    assert record["epsilon"] == pytest.approx(epsilon_after(1, 1.0, 1.0, 1e-5))


def test_privacy_config_errors():
    with pytest.raises(ConfigError, match="weighting = 'uniform'"):
        from_dict(FLConfig, {"privacy": {"mode": "central"}})
    with pytest.raises(ConfigError, match="unknown config key 'fl.privacy.sigma'"):
        from_dict(FLConfig, {"privacy": {"sigma": 1.0}}, "fl")
    with pytest.raises(ValueError, match="epsilon_budget"):
        PrivacyConfig(mode="central", noise_multiplier=0.0, epsilon_budget=1.0)


def test_loss_threshold_attack_by_hand():
    members = torch.tensor([0.1, 0.2, 0.3, 2.0])      # mean 0.65: 3 of 4 below
    nonmembers = torch.tensor([0.5, 1.0, 1.5, 3.0])   # 1 of 4 below
    out = loss_threshold_attack(members, nonmembers)
    assert out["threshold"] == pytest.approx(0.65)
    assert out["tpr"] == 0.75 and out["fpr"] == 0.25 and out["advantage"] == 0.5
    assert out["best_advantage"] == pytest.approx(0.75)  # threshold 0.3: 3/4 − 0
    same = loss_threshold_attack(members, members.clone())
    assert same["advantage"] == 0.0


def test_rounds_of_different_sampling_rates_compose():
    # two rounds at q = 1 and one at q = 0.5 compose as dp-accounting composes the three events
    z, delta = 1.3, 1e-5
    accountant = rdp.RdpAccountant(list(range(2, 64)) + [80, 96, 128, 192, 256, 512, 1024])
    accountant.compose(dp_accounting.GaussianDpEvent(z), 2)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)), 1)
    assert epsilon_of_rates([1.0, 0.5, 1.0], z, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert epsilon_of_rates([0.3] * 7, z, delta) == pytest.approx(epsilon_after(7, z, 0.3, delta), rel=1e-9)
    assert epsilon_of_rates([], z, delta) == 0.0
    with pytest.raises(ValueError, match="sampling rate"):
        epsilon_of_rates([0.0], z, delta)


def test_each_round_is_accounted_at_its_own_rate_and_old_checkpoints_still_count():
    server = _tiny_server({"mode": "central", "noise_multiplier": 2.0, "clip_norm": 0.5})
    state = server.initial_state()
    for _ in range(2):
        state, record = server.run_round(state)
    # 3 of 10 clients selected each round: q = 0.3, kept per released round
    assert state.opt_state["dp_rates"].tolist() == [0.3, 0.3] and record["dp_sample_rate"] == 0.3
    assert record["epsilon"] == pytest.approx(epsilon_after(2, 2.0, 0.3, 1e-5))
    # a checkpoint written before the rates were kept holds only the count: the configured q stands in
    legacy = {k: v for k, v in state.opt_state.items() if k != "dp_rates"}
    assert server.privacy.rates(legacy) == [server.privacy.sample_rate] * 2
