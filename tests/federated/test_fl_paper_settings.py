"""What reproducing the FedAvg paper needs: a target-accuracy stop, learning-rate decay, full-batch local training
(B = ∞: FedSGD with E = 1), and the two baselines a federated run is read against (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.baselines import centralised, equivalent_epochs, local_only
from plait.federated.config import FederatedRunConfig
from plait.federated.simulation import build_server
from plait.settings.config import ConfigError, from_dict
from tests_support import shapes_config


def test_the_run_stops_at_the_target_accuracy_and_records_the_round(tmp_path):
    raw = shapes_config(tmp_path, rounds=40, target_accuracy=0.9, lr_decay=0.9)
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["target_reached"] and records[-1]["test_accuracy"] >= 0.9 and len(records) < 40
    assert all(r["test_accuracy"] < 0.9 for r in records[:-1])  # it stopped at the first round that reached it
    assert records[0]["lr"] == pytest.approx(0.05) and records[1]["lr"] == pytest.approx(0.05 * 0.9)


def test_fedsgd_is_full_batch_one_epoch(tmp_path):
    raw = shapes_config(tmp_path, rounds=1)
    raw["fl"]["plan"] = {"epochs": 1, "batch_size": 0, "lr": 0.1}
    server = build_server(from_dict(FederatedRunConfig, raw))
    _, record = server.run_round(server.initial_state())
    assert record["participants"] == 3 and server.config.plan.num_steps(400) == 1  # one step per client


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="fl.target_accuracy"):
        from_dict(FederatedRunConfig, {"fl": {"target_accuracy": 1.5}})
    with pytest.raises(ConfigError, match="fl.lr_decay"):
        from_dict(FederatedRunConfig, {"fl": {"lr_decay": 0}})


def test_baselines_train_each_client_alone_and_one_model_on_all(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, rounds=10)))
    assert equivalent_epochs(server, 10) == 5  # 10 rounds · C 0.5 · E 1
    alone, together = local_only(server, 10), centralised(server, 10)
    assert 0 <= alone["local_accuracy_p10"] <= alone["local_accuracy_mean"] <= alone["local_accuracy_p90"] <= 1
    assert together["central_accuracy"] > 0.9  # the shapes are easy with all the data


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_paper_row_reaches_its_target_within_a_bound(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fedavg_paper.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    assert headline["plait"] is not None and headline["plait"] <= 2 * headline["reference"]  # 97% within 174 rounds
