"""Several runs side by side: the settings in which they differ, their final figures, their curves on one plot.

The point of Plait is to switch one design choice at a time and see what it changes. `plait compare runs/a runs/b
...` reads each run's resolved config.toml and metrics.jsonl (any plane: federated rounds, cluster steps, parameter
server clocks; old and new metric names alike, see metric_names.py) and writes into the output folder:

    compare.md    the settings that differ among runs of the same plane (and a line saying so when the runs come
                  from different planes), then one row per run: steps, final and best figures, time, traffic,
                  and for runs that measured their baselines (fl.baselines) each client alone's mean accuracy
                  and one model on all the data's
    compare.csv   the same rows, for a spreadsheet
    NAME.png      one titled figure per metric (test_accuracy, test_loss, ...), a line per run, against the
                  round/step axis; an SVG beside each PNG
    accuracy_vs_mb.png, NAME_vs_time.png   test accuracy against MB uploaded; accuracy and loss against seconds
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.experiment.plots import RECORD_AXIS, Figure, save_figure, series, x_key_of
from plait.runtime.metric_names import METRICS, canonical_records, plane_of
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import ConfigError, load_toml

TIME_KEYS = ("elapsed_s",)                          # seconds since the run (or its last resume) started
IGNORED_SETTINGS = {"run.name", "run.root"}         # differ between any two runs; say nothing about the design
TRAFFIC_KEYS = ("bytes_up", "bytes_down")           # per record; summed over the run, shown in MB
# What the console shows beside the settings; the baselines' columns only for runs that measured them
# (fl.baselines: baselines.json beside the metrics).
BASELINE_COLUMNS = {"each client alone": "local_accuracy_mean", "one model on all the data": "central_accuracy"}
HEADLINE = ("final accuracy", "final loss", "seconds", *BASELINE_COLUMNS)
# One figure per metric, a line per run, against the round/step axis (canonical names, metric_names.py).
COMPARED = ("test_accuracy", "test_loss", "train_loss", "fed_accuracy", "cumulative_bytes_up",
            "cumulative_bytes_down", "epsilon", "samples_per_s")
TITLES = {"test_accuracy": "test accuracy", "test_loss": "test loss", "train_loss": "training loss",
          "fed_accuracy": "federated accuracy", "cumulative_bytes_up": "MB uploaded",
          "cumulative_bytes_down": "MB downloaded", "epsilon": "privacy spent (ε)", "samples_per_s": "throughput"}


@dataclass(slots=True)
class RunView:
    label: str
    settings: dict[str, Any]        # the resolved config, flattened to "section.key" (empty if none was saved)
    records: list[dict[str, Any]]   # under canonical names (metric_names.py)
    plane: str | None = None        # federated, data parallel, pipeline, parameter server (None: unknown)
    baselines: dict[str, Any] = field(default_factory=dict)  # its baselines.json (fl.baselines), if any

    def x_key(self) -> str:
        """The round/step/clock axis; a log with none of them is drawn against its record number."""
        return x_key_of(self.records)

    def time_key(self) -> str | None:
        return next((k for k in TIME_KEYS if any(k in r for r in self.records)), None)

    def series(self, name: str, x_key: str) -> list[tuple[float, float]]:
        """(x, value in the metric's unit) for the records carrying a finite number under `name`."""
        return series(self.records, name, x_key)


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_comparison(path: str | Path) -> bool:
    """An earlier comparison's output folder (a `runs/*` glob picks it up beside the runs)."""
    return (Path(path) / "compare.md").exists() and not (Path(path) / "metrics.jsonl").exists()


def load_run(path: str | Path) -> RunView:
    path = Path(path)
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"compare: no metrics in {path / 'metrics.jsonl'} (is {path} a run directory?)")
    config_path = path / "config.toml"
    try:
        config = load_toml(config_path) if config_path.exists() else {}
    except ConfigError as err:
        raise ValueError(f"compare: {err}") from err
    plane = plane_of(config, records)
    return RunView(path.name, flatten(config), canonical_records(records, plane), plane, _baselines(path))


def _baselines(path: Path) -> dict[str, Any]:
    """The run's baselines.json, or {} (none measured, or a file cut short)."""
    try:
        summary = json.loads((path / "baselines.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def by_plane(runs: list[RunView]) -> dict[str, list[RunView]]:
    """The runs grouped by the plane that wrote them, in the order they were given."""
    groups: dict[str, list[RunView]] = {}
    for run in runs:
        groups.setdefault(run.plane or "unknown plane", []).append(run)
    return groups


def differing_settings(runs: list[RunView]) -> list[str]:
    """The config keys whose values are not the same among the runs of one plane that saved a config (a key
    missing from one of them counts as differing; a run without config.toml has nothing to compare). Runs of
    different planes share almost no settings: they are compared within their plane, never across."""
    missing, differing = object(), set()
    for group in by_plane(runs).values():
        configured = [run for run in group if run.settings]
        keys = set().union(*(run.settings for run in configured)) - IGNORED_SETTINGS
        differing |= {k for k in keys if len({repr(run.settings.get(k, missing)) for run in configured}) > 1}
    return sorted(differing)


def plane_note(runs: list[RunView]) -> str:
    """One line when the runs come from different planes (empty when they are all of one)."""
    groups = by_plane(runs)
    if len(groups) < 2:
        return ""
    listed = "; ".join(f"{plane} ({', '.join(run.label for run in group)})" for plane, group in groups.items())
    return f"runs of different planes: {listed}; settings are compared only among runs of the same plane"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _last(run: RunView, name: str) -> float | None:
    values = [v for r in run.records if (v := _number(r.get(name))) is not None]
    return values[-1] if values else None


def summary_row(run: RunView, settings: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.label, "plane": run.plane or ""}
    row.update({k: run.settings.get(k, "") for k in settings})
    x_key = run.x_key()
    row[x_key] = len(run.records) if x_key == RECORD_AXIS else _last(run, x_key)
    accuracies = [v for r in run.records if (v := _number(r.get("test_accuracy"))) is not None]
    row["final accuracy"] = accuracies[-1] if accuracies else None
    row["best accuracy"] = max(accuracies) if accuracies else None
    # the test loss where the run evaluates it, else the training loss (data parallel and pipeline log only that)
    row["final loss"] = next((v for k in ("test_loss", "train_loss", "loss") if (v := _last(run, k)) is not None),
                             None)
    time_key = run.time_key()
    row["seconds"] = _last(run, time_key) if time_key else None
    for key in TRAFFIC_KEYS:
        values = [v for r in run.records if (v := _number(r.get(key))) is not None]
        row[f"MB {key[6:]}"] = sum(values) / 1e6 if values else None  # no traffic logged: no figure, not zero
    for column, key in BASELINE_COLUMNS.items():  # accuracies at the run's compute (experiment/runs/fl_baselines.py)
        if run.baselines:
            row[column] = _number(run.baselines.get(key))
    return row


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_tables(rows: list[dict[str, Any]], settings: list[str], note: str, out_dir: Path) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    md = out_dir / "compare.md"
    lines = ["# Runs compared", ""]
    lines += [note[0].upper() + note[1:] + ".", ""] if note else []
    lines += ["Settings that differ: " + (", ".join(f"`{k}`" for k in settings) if settings else "none"), ""]
    lines += ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = out_dir / "compare.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row.get(c) for c in columns} for row in rows)
    return md, table


def _lines(runs: list[RunView], name: str, x_of) -> list[tuple[str, list[tuple[float, float]]]]:
    """A line per run that logs `name` against the axis `x_of(run)` names (runs without that axis left out)."""
    return [(run.label, points) for run in runs if (x_key := x_of(run)) and (points := run.series(name, x_key))]


def comparison_figures(runs: list[RunView]) -> dict[str, Figure]:
    """By file stem: one figure per metric against the round/step axis, accuracy against MB uploaded and against
    time, loss against time; those no run logs are left out."""
    axis = " / ".join(dict.fromkeys(run.x_key() for run in runs))
    xs = [x for run in runs for x, _ in series(run.records, run.x_key(), run.x_key())] if RECORD_AXIS not in axis \
        else [1, max(len(run.records) for run in runs)]
    x_range = (min(xs), max(xs)) if xs else None  # the runs' whole axis: a metric logged once is not a lone dot
    figures = {}
    for name in COMPARED:
        figures[name] = Figure(f"{TITLES[name]} by {axis}", axis, METRICS[name].label,
                               _lines(runs, name, RunView.x_key), legend=True, x_range=x_range)
    against_mb = _against(runs, "cumulative_bytes_up")
    figures["accuracy_vs_mb"] = Figure("test accuracy against MB uploaded", METRICS["cumulative_bytes_up"].label,
                                       METRICS["test_accuracy"].label, against_mb, integer_x=False, legend=True,
                                       x_range=(0.0, max(x for _, pts in against_mb for x, _ in pts))
                                       if against_mb else None)
    for name in ("test_accuracy", "test_loss", "train_loss"):
        figures[f"{name}_vs_time"] = Figure(f"{TITLES[name]} against time", METRICS["elapsed_s"].label,
                                            METRICS[name].label, _lines(runs, name, RunView.time_key),
                                            integer_x=False, legend=True)
    return {stem: figure for stem, figure in figures.items() if figure.lines}


def _against(runs: list[RunView], x_metric: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """Test accuracy (%) against another logged quantity, a line per run that logs both."""
    x_scale, lines = METRICS[x_metric].scale, []
    for run in runs:
        points = [(x * x_scale, y * 100) for r in run.records
                  if (x := _number(r.get(x_metric))) is not None and (y := _number(r.get("test_accuracy"))) is not None]
        if points:
            lines.append((run.label, points))
    return lines


def plot_comparison(runs: list[RunView], out_dir: Path) -> list[Path]:
    """The comparison's figures as PNG (an SVG beside each); returns the PNG paths."""
    return [save_figure(out_dir / f"{stem}.png", figure, figsize=(7, 4.5), markers_below=40)
            for stem, figure in comparison_figures(runs).items()]


@dataclass(slots=True)
class Comparison:
    settings: list[str]
    rows: list[dict[str, Any]]
    files: list[Path]
    note: str = ""                  # set when the runs come from different planes
    planes: dict[str, list[str]] = field(default_factory=dict)   # plane -> run labels


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> Comparison:
    run_dirs = [path for path in run_dirs if not is_comparison(path)]
    if len(run_dirs) < 2:
        raise ValueError("compare: give at least two run directories")
    runs = [load_run(path) for path in run_dirs]
    labels = [run.label for run in runs]
    for run, path in zip(runs, run_dirs):  # two runs named alike (a/demo, b/demo): tell them apart by their parent
        if labels.count(run.label) > 1:
            run.label = f"{Path(path).parent.name}/{run.label}"
    labels = [run.label for run in runs]
    for index, run in enumerate(runs):  # still alike (the same folder twice): number them
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({index + 1})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings, note = differing_settings(runs), plane_note(runs)
    rows = [summary_row(run, settings) for run in runs]
    md, table = write_tables(rows, settings, note, out_dir)
    planes = {plane: [run.label for run in group] for plane, group in by_plane(runs).items()}
    return Comparison(settings, rows, [md, table, *plot_comparison(runs, out_dir)], note, planes)
