"""The driver's federated round loop (`experiment/runs/fl_rounds.py`) on a stand-in for the round loop: what it adds
to each record, what it checkpoints, how it resumes (a log with the older metric names included), the early stop,
a diverging round, and a process whose run writes nothing."""

import time

import pytest
import torch

from plait.experiment.run import Run
from plait.experiment.rundir import prepare_run_dir
from plait.experiment.runs.fl_rounds import drive_rounds
from plait.federated.bounds import Diverged
from plait.federated.round_loop import ServerState
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics


class CountingRounds:
    """Rounds whose global "model" counts the rounds done; it stops or diverges where told."""

    def __init__(self, stop_at: int = 0, diverge_at: int = 0):
        self.initial_params = torch.zeros(3)
        self.stop_at, self.diverge_at = stop_at, diverge_at
        self.loaded_extra = None

    def initial_state(self):
        return ServerState(0, self.initial_params.clone(), {})

    def run_round(self, state):
        idx = state.round + 1
        if idx == self.diverge_at:
            raise Diverged(f"round {idx}: the test_loss of the new global model is nan")
        record = {"round": idx, "test_accuracy": idx / 10}
        if idx == self.stop_at:
            record["stop"] = True
        return ServerState(idx, state.params + 1, {"steps": torch.tensor(idx)}), record

    def checkpoint_extra(self):
        return {"extra": "residuals"}

    def load_checkpoint_extra(self, ckpt):
        self.loaded_extra = ckpt["extra"]


def _run(tmp_path, total, *, resume=False, writes=True):
    run_dir = prepare_run_dir(tmp_path, "fl", resume) if writes else prepare_run_dir(tmp_path, "follower", False)
    return Run(run_dir, resume=resume, writes=writes, step_key="round", total=total, description="rounds",
               tensorboard=False, show_progress=False)


def test_every_record_gets_elapsed_and_unix_time_and_every_round_a_checkpoint(tmp_path):
    before = time.time()
    with _run(tmp_path, 3) as run:
        state, last = drive_rounds(CountingRounds(), run)
    records = read_metrics(tmp_path / "fl" / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3] and last == records[-1]
    assert all(before <= r["time"] <= time.time() for r in records)
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    ckpt = load_checkpoint(tmp_path / "fl" / "checkpoint.pt")
    assert ckpt["round"] == 3 and ckpt["params"].tolist() == [3.0] * 3 and ckpt["extra"] == "residuals"
    assert state.round == 3 and int(ckpt["opt_state"]["steps"]) == 3


def test_a_resume_goes_on_from_the_checkpoint_of_a_log_with_the_older_names(tmp_path):
    # Prepare: two rounds done, the log rewritten as a run before the canonical names wrote it, one round too many
    with _run(tmp_path, 2) as run:
        drive_rounds(CountingRounds(), run)
    log = tmp_path / "fl" / "metrics.jsonl"
    log.write_text('{"round": 1, "accuracy": 0.1, "loss": 2.0, "elapsed_s": 50.0}\n'
                   '{"round": 2, "accuracy": 0.2, "loss": 1.5, "elapsed_s": 100.0}\n'
                   '{"round": 3, "accuracy": 0.3, "loss": 1.0, "elapsed_s": 150.0}\n')  # after the checkpoint
    rounds = CountingRounds()
    # Execute
    with _run(tmp_path, 4, resume=True) as run:
        state, _ = drive_rounds(rounds, run)
    # Assert: round 3 redone once, the clock going on from the kept log, the extras handed back
    records = read_metrics(log)
    assert [r["round"] for r in records] == [1, 2, 3, 4] and rounds.loaded_extra == "residuals"
    assert records[1]["accuracy"] == 0.2 and records[2]["test_accuracy"] == 0.3 and "accuracy" not in records[2]
    assert 100.0 <= records[2]["elapsed_s"] <= records[3]["elapsed_s"] < 150.0
    assert state.round == 4 and state.params.tolist() == [4.0] * 3


def test_a_round_that_asks_to_stop_ends_the_run(tmp_path):
    with _run(tmp_path, 10) as run:
        state, last = drive_rounds(CountingRounds(stop_at=2), run)
    assert state.round == 2 and last["stop"] and len(read_metrics(tmp_path / "fl" / "metrics.jsonl")) == 2


def test_a_diverging_round_is_logged_and_the_last_good_checkpoint_named(tmp_path):
    named = r"last good checkpoint is .*checkpoint.pt \(round 2\)"
    with _run(tmp_path, 5) as run, pytest.raises(Diverged, match=named):
        drive_rounds(CountingRounds(diverge_at=3), run)
    records = read_metrics(tmp_path / "fl" / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3] and "nan" in records[-1]["diverged"] and "time" in records[-1]
    assert load_checkpoint(tmp_path / "fl" / "checkpoint.pt")["round"] == 2


def test_a_run_that_does_not_write_runs_the_same_rounds_and_leaves_no_file(tmp_path):
    with _run(tmp_path, 3, writes=False) as run:
        state, last = drive_rounds(CountingRounds(), run)
    assert state.round == 3 and last["round"] == 3 and last["elapsed_s"] >= 0
    assert list((tmp_path / "follower").iterdir()) == []
