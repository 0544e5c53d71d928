"""benchmarks/fedavg_paper.py's rows: each is a valid run config, and the Shakespeare rows (char-LSTM, FedSGD and
FedAvg, natural and IID) and the next-word row each start and run a round (issue 17). The full rows take days on 2
cores; here each client keeps a handful of examples."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plait.federated.config import FederatedRunConfig
from plait.settings.config import from_dict

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fedavg_paper.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("fedavg_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def test_every_row_is_a_valid_run_config_with_the_papers_setting(tmp_path):
    bench = _benchmark()
    for name, row in bench.ROWS.items():
        config = from_dict(FederatedRunConfig, bench.row_config(name, row["lr"], 3, tmp_path,
                                                                max_examples_per_client=20))
        assert config.fl.fraction == 0.1 and config.fl.target_accuracy == row["target"], name
        assert config.fl.plan.batch_size == row["batch_size"] and config.model.name == row["model"], name
    lstm = {n: r for n, r in bench.ROWS.items() if r["model"] == "char_lstm"}
    assert {(r["partition"], r["batch_size"]) for r in lstm.values()} == {("iid", 0), ("natural", 0), ("iid", 10),
                                                                          ("natural", 10)}
    assert all(r["target"] == 0.54 and r["data"]["num_clients"] == 1146 for r in lstm.values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_shakespeare_rows_start_and_run_a_round(tmp_path):
    rows = "lstm-iid-fedsgd,lstm-noniid-fedsgd,lstm-iid-e1-b10,lstm-noniid-e1-b10,next-word-e1-b10"
    result = subprocess.run([sys.executable, str(SCRIPT), "--rows", rows, "--max-rounds", "1", "--threads", "1",
                             "--max-examples-per-client", "10", "--no-baselines", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][:-1]
    assert [o["metric"].removeprefix("rounds_to_target_") for o in outcomes] == rows.split(",")
    assert all(0 <= o["test_accuracy"] <= 1 for o in outcomes)
    assert outcomes[-1]["test_accuracy"] <= outcomes[-1]["test_top3_accuracy"] and outcomes[-1]["reference"] is None
    assert (tmp_path / "results.md").read_text().count("\n| ") == 1 + len(outcomes)  # the rule, then a row each
