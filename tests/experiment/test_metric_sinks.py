"""Metric sinks: every record reaches metrics.jsonl, metrics.csv and TensorBoard event files, and a resumed run's
sinks start where its (truncated) log ends. TensorBoard's own reader checks what was written."""

from __future__ import annotations

import csv
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plait.experiment.runs.fl_simulation import run_federated
from plait.experiment.sinks import MetricSinks
from plait.federated.config import FederatedRunConfig
from plait.runtime.metrics_log import truncate_metrics
from plait.settings.config import from_dict


def _scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def _tags(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_each_record_reaches_jsonl_csv_and_tensorboard(tmp_path):
    # Prepare / Execute: a metric appears only from the second record on; traffic is counted
    with MetricSinks(tmp_path, "round") as sinks:
        sinks.write({"round": 1, "loss": 2.0, "bytes_up": 1500, "bytes_down": 500, "selected": [1, 2]})
        sinks.write({"round": 2, "loss": 1.0, "accuracy": 0.5, "bytes_up": 3000, "bytes_down": 0, "stop": True})
    # Assert: the CSV widened its header, lists were left out, booleans kept
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert list(rows[0]) == ["round", "loss", "bytes_up", "bytes_down", "accuracy", "stop"]
    assert [(r["round"], r["loss"], r["accuracy"]) for r in rows] == [("1", "2.0", ""), ("2", "1.0", "0.5")]
    # TensorBoard: every number against the round, and against the cumulative kilobytes sent (2, then 5)
    assert _scalars(tmp_path / "tb", "loss") == [(1, 2.0), (2, 1.0)]
    assert _scalars(tmp_path / "tb", "vs_kB/loss") == [(2, 2.0), (5, 1.0)]
    assert _scalars(tmp_path / "tb", "accuracy") == [(2, 0.5)]
    assert "round" not in _tags(tmp_path / "tb") and "stop" not in _tags(tmp_path / "tb")


def test_resumed_sinks_redo_the_steps_after_the_checkpoint_once(tmp_path):
    with MetricSinks(tmp_path, "step") as sinks:
        for step in (1, 2, 3):
            sinks.write({"step": step, "loss": float(step)})
    truncate_metrics(tmp_path / "metrics.jsonl", "step", 2)  # a crash after step 3, checkpoint at step 2
    # TensorBoard reads a folder's event files in name order: the time in whole seconds, then a per-process counter
    # that sorts "10" before "9" in a test process that made many writers; a resumed run starts later
    time.sleep(1.05)
    with MetricSinks(tmp_path, "step", resume_after=2) as sinks:
        sinks.write({"step": 3, "loss": 30.0})
        sinks.write({"step": 4, "loss": 40.0})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "30.0"), ("4", "40.0")]
    assert _scalars(tmp_path / "tb", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_federated_run_writes_tensorboard_and_csv_unless_told_not_to(tmp_path):
    raw = {"run": {"name": "tb", "root": str(tmp_path), "seed": 1, "threads": 1},
           "data": {"num_clients": 4, "partition": "iid"},
           "fl": {"rounds": 2, "fraction": 0.5, "min_clients": 1, "plan": {"max_steps": 2}}}
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    assert {"test_accuracy", "train_loss", "vs_kB/test_accuracy"} <= _tags(summary.run_dir / "tb")
    assert [step for step, _ in _scalars(summary.run_dir / "tb", "test_accuracy")] == [1, 2]
    assert len((summary.run_dir / "metrics.csv").read_text().splitlines()) == 3
    raw["run"].update(name="no-tb", tensorboard=False)
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    assert not (summary.run_dir / "tb").exists() and (summary.run_dir / "metrics.csv").exists()
