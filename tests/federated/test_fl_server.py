import numpy as np
import torch

from plait.core.aggregate import weighted_mean
from plait.federated.client_update import ClientData, client_update
from plait.federated.config import FederatedRunConfig
from plait.federated.selection import select_clients
from plait.federated.server import client_seed
from plait.federated.simulation import build_server
from plait.settings.config import from_dict


def _config(tmp_path, **fl):
    data = {"run": {"name": "t", "root": str(tmp_path), "seed": 3},
            "data": {"num_clients": 8, "partition": "iid", "eval_fraction": 0.1},
            "fl": {"rounds": 2, "fraction": 0.5, "min_clients": 1, "plan": {"max_steps": 3, "lr": 0.05}, **fl}}
    return from_dict(FederatedRunConfig, data)


def test_one_round_is_fedavg_of_the_selected_clients(tmp_path):
    # Prepare
    server = build_server(_config(tmp_path))
    state = server.initial_state()
    # Execute
    new_state, record = server.run_round(state)
    # Assert: recompute the round by hand from the record's participants
    assert record["participants"] == 4 and record["dropped"] == 0 and new_state.round == 1
    chosen = _selected(server, 1)
    assert len(chosen) == 4
    deltas, weights = [], []
    for cid in chosen:
        plan = server.config.plan.for_client(client_seed(3, 1, cid))
        data = ClientData(*server.data.client_train(cid))
        update = client_update(server.model, server.spec, state.params, data, plan)
        deltas.append(update.delta)
        weights.append(update.num_examples)
    expected = state.params + weighted_mean(deltas, weights)  # FedAvg: server SGD with lr 1 on the mean delta
    assert torch.allclose(new_state.params, expected, atol=1e-6)
    assert record["bytes_down"] == 4 * 199_210 * 4 and record["bytes_up"] == 4 * 199_210 * 4
    assert 0 <= record["test_accuracy"] <= 1


def _selected(server, round_idx):
    cfg = server.config
    rng = np.random.default_rng([server.seed, 3, round_idx])
    return select_clients(server.devices.properties(round_idx), cfg.fraction, cfg.min_clients, cfg.over_selection,
                          server.eligible, rng).selected


def test_stragglers_are_dropped_and_counted(tmp_path):
    # 8 clients, C=0.5 → target 4, over-select 50% → 6 selected; slow devices miss a tight deadline
    config = _config(tmp_path, over_selection=0.5,
                     devices={"speed_sigma": 1.5, "step_time_s": 1.0, "deadline_s": 4.0})
    server = build_server(config)
    _, record = server.run_round(server.initial_state())
    assert record["selected"] == 6
    assert record["participants"] + record["dropped"] == 6
    assert record["participants"] <= 4 and record["dropped"] >= 2
    assert record.get("skipped") or record["sim_time_s"] <= 4.0  # every kept client met the deadline


def test_eligibility_and_skipped_round_keep_the_model(tmp_path):
    config = _config(tmp_path, min_clients=3, eligibility={"charging": True}, devices={"p_charging": 0.0})
    server = build_server(config)
    state = server.initial_state()
    new_state, record = server.run_round(state)
    assert record["skipped"] and record["eligible"] == 0 and record["participants"] == 0
    assert torch.equal(new_state.params, state.params)


def test_federated_evaluation_on_held_out_client_data(tmp_path):
    config = _config(tmp_path, federated_eval_every=1)  # eval_fraction 0.1 in _config's data
    server = build_server(config)
    _, record = server.run_round(server.initial_state())
    assert 0 <= record["fed_accuracy"] <= 1 and record["fed_loss"] > 0


def test_settings_checked_against_the_data_fail_at_start(tmp_path):
    import pytest

    # 8 IID clients of 7,500 examples: a secagg weight bound of 1,000 cannot hold n_k
    with pytest.raises(ValueError, match="fl.strategy.secagg.max_weight"):
        build_server(_config(tmp_path, min_clients=2, strategy={"name": "secagg", "secagg": {"max_weight": 1000}}))
    # adaptive clipping with a count noise too small for z: named before any round runs
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        build_server(_config(tmp_path, strategy={"weighting": "uniform"},
                             privacy={"mode": "central", "adaptive": True, "noise_multiplier": 1.0,
                                      "clipped_count_stddev": 0.1}))


def test_run_round_leaves_its_input_state_alone(tmp_path):
    # Adam keeps moments in the state: the same round from the same state twice gives the same result
    server = build_server(_config(tmp_path, server_opt={"name": "adam", "lr": 0.01}))
    start = server.initial_state()
    first, _ = server.run_round(start)
    second, _ = server.run_round(start)
    assert torch.equal(first.params, second.params)
    assert all(torch.equal(first.opt_state[k], second.opt_state[k]) for k in first.opt_state)


def test_dp_noise_is_secret_unless_asked_to_be_seeded(tmp_path):
    privacy = {"mode": "local", "clip_norm": 0.5, "noise_multiplier": 1.0}
    def one_round(**extra):
        server = build_server(_config(tmp_path, privacy={**privacy, **extra}))
        return server.run_round(server.initial_state())[0].params
    assert not torch.equal(one_round(), one_round())  # OS entropy: nobody can regenerate it from the config
    assert torch.equal(one_round(seeded_noise=True), one_round(seeded_noise=True))


def test_too_few_updates_for_krum_skip_the_round(tmp_path):
    # 8 clients, C = 0.375 → 3 reports; with f = floor(0.45 · 3) = 1 Krum needs f + 3 = 4: skipped, run goes on
    server = build_server(_config(tmp_path, fraction=0.375, min_clients=3,
                                  strategy={"name": "krum", "byzantine_fraction": 0.45}))
    state = server.initial_state()
    new_state, record = server.run_round(state)
    assert record["participants"] == 3 and record["skipped"] and "f + 3" in record["aggregation_error"]
    assert torch.equal(new_state.params, state.params)
