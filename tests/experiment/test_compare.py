"""`plait compare`: the settings that differ, the figures of each run (checked against hand-written metrics), the
tables and plots written, and clear errors."""

from __future__ import annotations

import csv
import json

import pytest
import tomli_w

from plait.experiment.compare import compare_runs, comparison_figures, differing_settings, flatten, load_run
from tests_support import run_plait


def make_run(root, name, config, records):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_bytes(tomli_w.dumps(config).encode())
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def config(lr, partition="iid", name="x"):
    return {"run": {"name": name, "root": "runs", "seed": 0},
            "data": {"partition": partition}, "fl": {"rounds": 3, "plan": {"lr": lr, "epochs": 1}}}


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path, "a", config(0.1, name="a"), [
        {"round": 1, "accuracy": 0.5, "loss": 1.2, "bytes_up": 100, "bytes_down": 200, "elapsed_s": 1.0},
        {"round": 2, "accuracy": 0.7, "loss": 0.9, "bytes_up": 100, "bytes_down": 200, "elapsed_s": 2.0},
        {"round": 3, "accuracy": 0.6, "loss": 0.8, "bytes_up": 50, "bytes_down": 200, "elapsed_s": 3.5}])
    b = make_run(tmp_path, "b", config(0.05, "shards", name="b"), [
        {"round": 1, "loss": 1.5, "skipped": True, "elapsed_s": 0.5},
        {"round": 2, "accuracy": 0.4, "loss": 1.1, "elapsed_s": 1.5}])
    return a, b


def test_flatten_and_the_settings_that_differ(two_runs):
    assert flatten({"fl": {"plan": {"lr": 0.1}}, "x": 1}) == {"fl.plan.lr": 0.1, "x": 1}
    runs = [load_run(path) for path in two_runs]
    # run.name differs too, but says nothing about the design; fl.rounds and fl.plan.epochs are equal
    assert differing_settings(runs) == ["data.partition", "fl.plan.lr"]


def test_rows_tables_and_plots_by_hand(two_runs, tmp_path):
    result = compare_runs(list(two_runs), tmp_path / "out")
    a, b = result.rows
    assert a == {"run": "a", "plane": "federated", "data.partition": "iid", "fl.plan.lr": 0.1, "round": 3,
                 "final accuracy": 0.6, "best accuracy": 0.7, "final loss": 0.8, "seconds": 3.5, "MB up": 250e-6,
                 "MB down": 600e-6}
    assert b["final accuracy"] == 0.4 and b["best accuracy"] == 0.4 and b["round"] == 2
    assert b["MB up"] is None and b["seconds"] == 1.5  # no traffic logged: no figure, not zero
    names = {path.name for path in result.files}
    assert {"compare.md", "compare.csv", "test_accuracy.png", "test_loss.png", "cumulative_bytes_up.png",
            "accuracy_vs_mb.png", "test_accuracy_vs_time.png"} <= names
    assert "epsilon.png" not in names and "train_loss.png" not in names  # no run logs them
    assert all(path.with_suffix(".svg").exists() for path in result.files if path.suffix == ".png")
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "Settings that differ: `data.partition`, `fl.plan.lr`" in md
    assert "| a | federated | iid | 0.1 | 3 | 0.6 | 0.7 | 0.8 | 3.5 | 0.00025 | 0.0006 |" in md
    with open(tmp_path / "out" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["a", "b"] and rows[1]["fl.plan.lr"] == "0.05"


def test_runs_that_measured_their_baselines_show_them_beside_their_accuracy(two_runs, tmp_path):
    a, b = two_runs
    (a / "baselines.json").write_text(json.dumps({"local_accuracy_mean": 0.2, "central_accuracy": 0.9}))
    (b / "baselines.json").write_text("{cut")  # a file cut short: no figures, not an error
    first, second = compare_runs(list(two_runs), tmp_path / "out").rows
    assert first["each client alone"] == 0.2 and first["one model on all the data"] == 0.9
    assert "each client alone" not in second
    shown = run_plait("compare", a, b, "--out", tmp_path / "cli")
    assert shown.exit_code == 0 and "each client alone" in shown.stdout and "one model on all the data" in shown.stdout


def test_runs_with_the_same_name_are_told_apart_by_their_parent(tmp_path):
    first = make_run(tmp_path / "monday", "demo", config(0.1), [{"round": 1, "accuracy": 0.5}])
    second = make_run(tmp_path / "tuesday", "demo", config(0.2), [{"round": 1, "accuracy": 0.6}])
    result = compare_runs([first, second], tmp_path / "out")
    assert [row["run"] for row in result.rows] == ["monday/demo", "tuesday/demo"]


def test_errors_name_the_problem(two_runs, tmp_path):
    with pytest.raises(ValueError, match="at least two run directories"):
        compare_runs([two_runs[0]], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics in .*empty"):
        compare_runs([two_runs[0], tmp_path / "empty"], tmp_path / "out")


def test_cli_prints_the_table_and_writes_next_to_the_runs(two_runs, tmp_path):
    result = run_plait("compare", str(two_runs[0]), str(two_runs[1]))
    assert result.exit_code == 0, result.output
    assert "settings that differ: data.partition, fl.plan.lr" in result.output
    assert (tmp_path / "compare-a-b" / "compare.md").exists()
    bad = run_plait("compare", str(two_runs[0]), str(tmp_path / "nowhere"))
    assert bad.exit_code == 2 and "no metrics in" in bad.output


def test_edge_cases_nan_no_axis_no_config_same_folder_twice(tmp_path):
    a = make_run(tmp_path, "a", config(0.1), [
        {"round": 1, "accuracy": None, "bytes_up": None}, {"round": 2, "accuracy": 0.9, "bytes_up": None},
        {"round": 3, "accuracy": float("nan")}])
    bare = tmp_path / "bare"  # no config.toml, and no round/step/clock key: drawn against the record number
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"accuracy": 0.2, "ok": true}\n{"accuracy": 0.3, "ok": false}\n')
    b = make_run(tmp_path, "b", config(0.2), [{"round": 1, "accuracy": 0.5}])
    result = compare_runs([a, bare, b, b], tmp_path / "out")
    rows = {row["run"]: row for row in result.rows}
    assert rows["a"]["best accuracy"] == 0.9 and rows["a"]["final accuracy"] == 0.9  # NaN and None skipped
    assert rows["a"]["MB up"] is None  # only None logged: no figure
    assert rows["bare"]["record"] == 2 and rows["bare"]["best accuracy"] == 0.3
    assert result.settings == ["fl.plan.lr"]  # the run without a config does not make every setting differ
    assert len(rows) == 4 and sorted(label[-6:] for label in rows if "b (" in label) == ["/b (3)", "/b (4)"]
    assert (tmp_path / "out" / "test_accuracy.png").exists()


def test_a_glob_that_catches_an_earlier_comparison_skips_it(two_runs, tmp_path):
    assert run_plait("compare", str(two_runs[0]), str(two_runs[1])).exit_code == 0
    again = run_plait("compare", *sorted(str(p) for p in tmp_path.iterdir()))  # runs/* style
    assert again.exit_code == 0, again.output
    assert "settings that differ: data.partition, fl.plan.lr" in again.output


def test_runs_of_different_planes_are_named_not_listed_setting_by_setting(two_runs, tmp_path):
    dp_config = {"run": {"name": "dp", "root": "runs", "seed": 0}, "parallel": {"mode": "data", "overlap": True},
                 "sync": {"kind": "allreduce"}, "train": {"steps": 20, "lr": 0.1, "batch_size": 32}}
    dp = make_run(tmp_path, "dp", dp_config, [  # the data-parallel plane's older names: per-rank lists, train loss
        {"step": 10, "loss": 0.9, "bytes_sent": [1_000_000, 1_000_000], "bytes_recv": [500_000, 500_000],
         "elapsed_s": 1.0},
        {"step": 20, "loss": 0.5, "bytes_sent": [1_000_000, 1_000_000], "bytes_recv": [500_000, 500_000],
         "elapsed_s": 2.0, "accuracy": 0.9}])
    result = compare_runs([*two_runs, dp], tmp_path / "out")
    assert result.note == ("runs of different planes: federated (a, b); data parallel (dp); settings are compared "
                           "only among runs of the same plane")
    assert result.settings == ["data.partition", "fl.plan.lr"]  # not parallel.*, sync.*, train.*, fl.rounds ...
    row = result.rows[2]
    assert row["plane"] == "data parallel" and row["MB up"] == 4.0 and row["MB down"] == 2.0
    assert row["final loss"] == 0.5 and row["final accuracy"] == 0.9 and row["step"] == 20
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "Runs of different planes: federated (a, b); data parallel (dp)" in md
    cli = run_plait("compare", *map(str, two_runs), str(dp), "--out", str(tmp_path / "cli"))
    assert cli.exit_code == 0 and "runs of different planes" in cli.output


def test_old_and_new_names_compare_alike_and_figures_have_titles_and_units(two_runs, tmp_path):
    renamed = {"accuracy": "test_accuracy", "loss": "test_loss"}
    old = load_run(two_runs[0])
    new_records = [{renamed.get(k, k): v for k, v in r.items()} for r in
                   (json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines())]
    new = make_run(tmp_path / "new", "a", config(0.1, name="a"), new_records)
    assert load_run(new).records == old.records
    figures = comparison_figures([old, load_run(two_runs[1])])
    assert figures["test_accuracy"].title == "test accuracy by round"
    assert figures["test_accuracy"].y_label == "test accuracy (%)" and figures["test_accuracy"].x_label == "round"
    assert figures["test_accuracy"].lines[0] == ("a", [(1, 50.0), (2, 70.0), (3, 60.0)])
    assert figures["test_accuracy"].x_range == (1, 3) and figures["test_accuracy"].integer_x  # rounds 1..3 drawn
    assert figures["cumulative_bytes_up"].y_label == "uploaded so far (MB)"
    (label, points), = figures["accuracy_vs_mb"].lines
    assert label == "a" and points == [(pytest.approx(x), y) for x, y in [(1e-4, 50.0), (2e-4, 70.0), (2.5e-4, 60.0)]]
