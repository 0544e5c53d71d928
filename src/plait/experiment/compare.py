"""Several runs side by side: the settings in which they differ, their final figures, their curves on one plot.

The point of Plait is to switch one design choice at a time and see what it changes. `plait compare runs/a runs/b
...` reads each run's resolved config.toml and metrics.jsonl (any plane: federated rounds, cluster steps, parameter
server clocks) and writes into the output folder:

    compare.md    the settings that differ, then one row per run: steps, final and best figures, time, traffic
    compare.csv   the same rows, for a spreadsheet
    NAME.png      one plot per metric, a line per run, against the round/step axis
    NAME_vs_time.png   accuracy and loss against elapsed seconds, where the runs log time
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.experiment.config import ConfigError, load_toml
from plait.experiment.metrics import read_metrics
from plait.experiment.plots import DEFAULT_SERIES, X_KEYS, save_line_plot

TIME_KEYS = ("elapsed_s",)                          # seconds since the run (or its last resume) started
RECORD_AXIS = "record"                              # the axis of a log with no round/step/clock key
IGNORED_SETTINGS = {"run.name", "run.root"}         # differ between any two runs; say nothing about the design
TRAFFIC_KEYS = ("bytes_up", "bytes_down")           # per record; summed over the run, shown in MB
HEADLINE = ("final accuracy", "final loss", "seconds")  # what the console shows beside the settings


@dataclass(slots=True)
class RunView:
    label: str
    settings: dict[str, Any]        # the resolved config, flattened to "section.key" (empty if none was saved)
    records: list[dict[str, Any]]

    def x_key(self) -> str:
        """The round/step/clock axis; a log with none of them is drawn against its record number."""
        return next((k for k in X_KEYS if any(k in r for r in self.records)), RECORD_AXIS)

    def time_key(self) -> str | None:
        return next((k for k in TIME_KEYS if any(k in r for r in self.records)), None)

    def series(self, name: str, x_key: str) -> list[tuple[float, float]]:
        """(x, value) for the records carrying a finite number under `name` (NaN, None and booleans skipped)."""
        return [(index if x_key == RECORD_AXIS else r[x_key], r[name])
                for index, r in enumerate(self.records, start=1)
                if (x_key == RECORD_AXIS or x_key in r) and _number(r.get(name)) is not None]


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
        settings = flatten(load_toml(config_path)) if config_path.exists() else {}
    except ConfigError as err:
        raise ValueError(f"compare: {err}") from err
    return RunView(path.name, settings, records)


def differing_settings(runs: list[RunView]) -> list[str]:
    """The config keys whose values are not the same in every run that saved a config (a key missing from one of
    them counts as differing; a run without config.toml has nothing to compare)."""
    configured = [run for run in runs if run.settings]
    keys = sorted(set().union(*(run.settings for run in configured)) - IGNORED_SETTINGS)
    missing = object()
    return [k for k in keys if len({repr(run.settings.get(k, missing)) for run in configured}) > 1]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _last(run: RunView, name: str) -> float | None:
    values = [v for r in run.records if (v := _number(r.get(name))) is not None]
    return values[-1] if values else None


def summary_row(run: RunView, settings: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.label}
    row.update({k: run.settings.get(k, "") for k in settings})
    x_key = run.x_key()
    row[x_key] = len(run.records) if x_key == RECORD_AXIS else _last(run, x_key)
    accuracies = [v for _, v in run.series("accuracy", x_key)]
    row["final accuracy"] = _last(run, "accuracy")
    row["best accuracy"] = max(accuracies) if accuracies else None
    row["final loss"] = _last(run, "loss")
    time_key = run.time_key()
    row["seconds"] = _last(run, time_key) if time_key else None
    for key in TRAFFIC_KEYS:
        values = [v for r in run.records if (v := _number(r.get(key))) is not None]
        row[f"MB {key[6:]}"] = sum(values) / 1e6 if values else None  # no traffic logged: no figure, not zero
    return row


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_tables(rows: list[dict[str, Any]], settings: list[str], out_dir: Path) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    md = out_dir / "compare.md"
    lines = ["# Runs compared", ""]
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


def _plot(runs: list[RunView], name: str, x_of, x_label: str, path: Path) -> bool:
    """A line per run that logs `name`; False (nothing written) when none does."""
    lines = [(run.label, points) for run in runs if (x_key := x_of(run)) and (points := run.series(name, x_key))]
    if lines:
        save_line_plot(path, lines, x_label, name, legend=True, figsize=(7, 4.5), markers_below=40)
    return bool(lines)


def plot_comparison(runs: list[RunView], out_dir: Path) -> list[Path]:
    written = []
    axis = "/".join(dict.fromkeys(k for run in runs if (k := run.x_key())))
    for name in DEFAULT_SERIES:
        path = out_dir / f"{name}.png"
        if _plot(runs, name, RunView.x_key, axis, path):
            written.append(path)
    for name in ("accuracy", "loss"):
        path = out_dir / f"{name}_vs_time.png"
        if _plot(runs, name, RunView.time_key, "seconds since the start", path):
            written.append(path)
    return written


@dataclass(slots=True)
class Comparison:
    settings: list[str]
    rows: list[dict[str, Any]]
    files: list[Path]


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
    settings = differing_settings(runs)
    rows = [summary_row(run, settings) for run in runs]
    md, table = write_tables(rows, settings, out_dir)
    return Comparison(settings, rows, [md, table, *plot_comparison(runs, out_dir)])
