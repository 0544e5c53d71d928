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


def test_resume_goes_on_in_the_rows_own_directory_and_reads_a_row_that_reached_its_target(tmp_path):
    """A long row survives the end of a session: `--resume` continues its run directory from the last checkpoint;
    a row that reached its target is read again, not trained further."""
    bench = _benchmark()
    bench.ROWS["tiny"] = {**bench.ROWS["2nn-iid-b10"], "target": 0.999}  # not reached in a few rounds
    first, _ = bench.run_row("tiny", 0.1, 1, tmp_path)
    assert first.rounds is None and [r for r, _ in first.curve] == [1]
    more, _ = bench.run_row("tiny", 0.1, 2, tmp_path, resume=True)
    assert [r for r, _ in more.curve] == [1, 2] and more.curve[0] == first.curve[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-lr0.1"]  # no second directory beside it
    assert more.seconds > first.seconds  # elapsed time goes on over the resume
    bench.ROWS["easy"] = {**bench.ROWS["2nn-iid-b10"], "target": 0.5}  # reached in the first round
    reached, _ = bench.run_row("easy", 0.1, 5, tmp_path)
    assert reached.rounds == 1
    again, _ = bench.run_row("easy", 0.1, 5, tmp_path, resume=True)
    assert again.rounds == 1 and again.curve == reached.curve  # read, not run on to round 5
    fresh, _ = bench.run_row("easy", 0.1, 5, tmp_path)  # without --resume: a new directory beside it
    assert fresh.rounds == 1 and (tmp_path / "easy-lr0.1-2").is_dir()


def test_a_row_evaluated_every_k_rounds_reports_the_first_evaluated_round_at_its_target(tmp_path):
    """--eval-every k makes a long row's evaluations k times cheaper; its round to target is then the first
    evaluated one (the 2NN passes 50% in round 1, which is not evaluated when k = 2)."""
    bench = _benchmark()
    bench.ROWS["easy"] = {**bench.ROWS["2nn-iid-b10"], "target": 0.5}
    outcome, _ = bench.run_row("easy", 0.1, 5, tmp_path, eval_every=2)
    assert outcome.rounds == 2 and [r for r, _ in outcome.curve] == [2]
    assert "2 (tested every 2)" in bench._table_row("easy", outcome, 5, {}, eval_every=2)
