"""What `plait run` says at the end: the figure the task has, why the run stopped, and rounds that changed nothing."""

import json

import pytest

from plait.experiment.runs.fl_outcome import outcome_lines
from plait.federated.config import FederatedRunConfig
from plait.settings.config import ConfigError, from_dict


def _log(tmp_path, records):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_run_that_trained_no_round_does_not_read_as_finished(tmp_path):
    _log(tmp_path, [{"round": 1, "selected": 13, "participants": 0, "skipped": True, "test_accuracy": 0.09},
                    {"round": 2, "selected": 13, "participants": 0, "skipped": True, "refused": 13,
                     "test_accuracy": 0.09}])
    lines = outcome_lines(tmp_path, {"round": 2, "test_accuracy": 0.09}, 2, 1.0)
    assert lines[0].startswith("final test accuracy: [bold]0.0900[/] after 2 rounds")
    assert lines[-1] == ("[yellow]warning:[/] 2 of 2 rounds changed nothing (1 quorum not reached, 1 updates "
                         "refused); the model never trained")


def test_the_stop_the_privacy_and_a_regression_loss_are_said(tmp_path):
    _log(tmp_path, [{"round": 1, "participants": 5, "test_loss": 0.5}])
    assert outcome_lines(tmp_path, {"round": 1, "test_loss": 0.5, "epsilon": 1.234}, 1, 2.0) == [
        "final test loss: [bold]0.5000[/] after 1 round (2.0 s)", "privacy spent: ε = 1.23"]
    _log(tmp_path, [{"round": 4, "participants": 5, "test_accuracy": 0.6, "target_reached": True, "stop": True}])
    assert "target accuracy reached at round 4" in outcome_lines(
        tmp_path, {"round": 4, "test_accuracy": 0.6, "target_reached": True, "stop": True}, 4, 1.0)


def test_a_quorum_larger_than_the_clients_is_refused_at_start():
    with pytest.raises(ConfigError, match="fl.min_clients = 5 is more than data.num_clients = 1"):
        from_dict(FederatedRunConfig, {"data": {"num_clients": 1}, "fl": {"min_clients": 5}})


def test_a_privacy_delta_that_allows_publishing_a_client_is_refused():
    with pytest.raises(ConfigError, match=r"fl.privacy.delta = 0.5 must be below 1 / data.num_clients = 0.01"):
        from_dict(FederatedRunConfig, {"fl": {"privacy": {"mode": "central", "delta": 0.5},
                                              "strategy": {"weighting": "uniform"}}})
