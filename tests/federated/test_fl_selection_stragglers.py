import dataclasses

import numpy as np
import pytest

from plait.federated.plan import TrainingPlan
from plait.federated.selection import requires, select_clients
from plait.federated.stragglers import DeviceConfig, DevicePool, split_on_time


def _props(num, charging_every=2):
    return {cid: {"charging": cid % charging_every == 0, "idle": True, "unmetered": True} for cid in range(num)}


def test_selection_only_eligible_fraction_of_registered():
    # Prepare: 100 registered clients, half charging; C = 0.1 → target 10
    props = _props(100)
    # Execute
    sel = select_clients(props, 0.1, 2, 0.0, requires(charging=True), np.random.default_rng(0))
    # Assert
    assert sel.target == 10 and len(sel.selected) == 10 and sel.num_eligible == 50
    assert all(props[c]["charging"] for c in sel.selected)
    assert len(set(sel.selected)) == 10


def test_selection_min_clients_and_over_selection():
    props = _props(20, charging_every=1)
    sel = select_clients(props, 0.1, 5, 0.5, requires(), np.random.default_rng(0))
    assert sel.target == 5 and len(sel.selected) == 8  # max(5, ceil(2)) = 5 → ceil(5 · 1.5) = 8


def test_selection_skips_round_without_quorum():
    props = _props(10, charging_every=5)  # 2 eligible
    sel = select_clients(props, 0.5, 3, 0.0, requires(charging=True), np.random.default_rng(0))
    assert sel.selected == [] and sel.num_eligible == 2


def test_selection_is_seeded():
    props = _props(100, charging_every=1)
    def pick(seed):
        return select_clients(props, 0.1, 1, 0.0, requires(), np.random.default_rng(seed)).selected
    assert pick(4) == pick(4) and pick(4) != pick(5)


def test_split_on_time_keeps_first_target_within_deadline():
    finish = {0: 5.0, 1: 1.0, 2: 3.0, 3: 9.0, 4: 2.0}
    assert split_on_time(finish, 3, 0.0) == ([1, 2, 4], [0, 3])     # over-selected surplus dropped
    assert split_on_time(finish, 3, 2.5) == ([1, 4], [0, 2, 3])      # deadline drops stragglers


def test_device_pool_speeds_and_finish_times():
    pool = DevicePool(DeviceConfig(speed_sigma=1.0, step_time_s=0.5), num_clients=50, seed=0)
    assert pool.speed.std() > 0.3  # heterogeneous
    fast = int(pool.speed.argmax())
    assert pool.finish_time(fast, 10, 0, 0) == pytest.approx(10 * 0.5 / pool.speed[fast])
    same = DevicePool(DeviceConfig(speed_sigma=1.0, step_time_s=0.5), num_clients=50, seed=0)
    assert np.array_equal(pool.speed, same.speed)


def test_device_properties_follow_probabilities():
    pool = DevicePool(DeviceConfig(p_charging=0.3), num_clients=2000, seed=1)
    share = np.mean([p["charging"] for p in pool.properties(1).values()])
    assert 0.25 < share < 0.35
    assert pool.properties(1) == pool.properties(1) and pool.properties(1) != pool.properties(2)


def test_plan_is_one_immutable_object_per_client():
    plan = TrainingPlan(epochs=2, batch_size=10, lr=0.1)
    a, b = plan.for_client(1), plan.for_client(2)
    assert a is not b and (a.seed, b.seed) == (1, 2) and a.epochs == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lr = 1.0  # frozen: assignment must fail
    assert plan.num_steps(95) == 2 * 10 and TrainingPlan(batch_size=0).num_steps(95) == 1


def test_plan_validation_names_the_setting():
    with pytest.raises(ValueError, match="plan.lr"):
        TrainingPlan(lr=0)


@pytest.mark.parametrize("fraction, expected", [(0.07, 7), (0.14, 14), (0.28, 28), (0.55, 55), (0.56, 56)])
def test_selection_count_has_no_float_rounding_error(fraction, expected):
    props = _props(100, charging_every=1)
    sel = select_clients(props, fraction, 1, 0.0, requires(), np.random.default_rng(0))
    assert sel.target == expected and len(sel.selected) == expected
    assert len(select_clients(_props(200, 1), 0.25, 1, 0.1, requires(), np.random.default_rng(0)).selected) == 55
