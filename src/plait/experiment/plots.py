"""The figures of one run, as PNG and SVG in RUN/plots: what a paper shows, with titles, units and integer rounds.

    accuracy           test (and federated) accuracy in %, against the round or step; with fl.baselines, one
                       model on all the data and each client alone (mean, p10-p90 band) beside it
    loss               training, test and federated loss on one figure
    accuracy_vs_mb     test accuracy against the MB uploaded so far (the figure of communication-efficient FL)
    accuracy_vs_time   test accuracy against elapsed seconds
    accuracy_vs_sim_time  test accuracy against the simulator's virtual clock (hours: device speeds, availability)
    traffic            MB uploaded and downloaded so far
    epsilon            ε spent, at the run's δ, with the ε budget as a dashed line (from config.toml)
    participation      clients selected, reporting and dropped per round
    throughput         samples per second

Records are read under their canonical names (`metric_names.py`), so old run directories plot alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.runtime.metric_names import METRICS, canonical_records, plane_of
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import ConfigError, load_toml

X_KEYS = ("round", "step", "clock")
HLINE_COLOURS = ("tab:red", "tab:purple", "tab:brown")  # a dashed line's colour, in the order they are added
RECORD_AXIS = "record"  # the axis of a log with no round/step/clock key: the record number
Point = tuple[float, float]


@dataclass(slots=True)
class Figure:
    """One figure: a line per (label, points), already in the units of the axis labels."""
    title: str
    x_label: str
    y_label: str
    lines: list[tuple[str, list[Point]]]
    integer_x: bool = True                      # rounds, steps, clocks: no fractional ticks
    integer_y: bool = False
    x_range: tuple[float, float] | None = None  # the run's whole axis, so a lone point is not drawn alone
    hlines: list[tuple[float, str]] = field(default_factory=list)   # (y, label), dashed: e.g. the ε budget
    bands: list[tuple[float, float, str]] = field(default_factory=list)  # (low, high, label), shaded: a spread
    annotate_last: bool = False                 # each line's last value in its legend entry
    legend: bool | None = None                  # None: when more than one line


def number(value: Any) -> float | None:
    """A finite number, or None (NaN, None, booleans and strings are not figures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(records: list[dict[str, Any]], name: str, x_key: str) -> list[Point]:
    """(x, value × the metric's scale) for every record that carries a finite value of `name`."""
    scale = METRICS[name].scale if name in METRICS else 1.0
    points = []
    for index, record in enumerate(records, start=1):
        x = index if x_key == RECORD_AXIS else number(record.get(x_key))
        y = number(record.get(name))
        if x is not None and y is not None:
            points.append((x, y * scale))
    return points


def x_key_of(records: list[dict[str, Any]]) -> str:
    return next((k for k in X_KEYS if any(k in r for r in records)), RECORD_AXIS)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config.toml as tables ({} when absent or unreadable: the plots do without it)."""
    try:
        return load_toml(run_dir / "config.toml") if (run_dir / "config.toml").exists() else {}
    except ConfigError:
        return {}


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """(records under canonical names, config tables, plane) of a run directory."""
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir / 'metrics.jsonl'}")
    config = read_config(run_dir)
    plane = plane_of(config, records)
    return canonical_records(records, plane), config, plane


def privacy_settings(config: dict[str, Any]) -> tuple[float | None, float | None]:
    """(δ, ε budget) of a federated run's [fl.privacy] (None where unset; a budget of 0 means none)."""
    privacy = config.get("fl", {}).get("privacy", {}) if isinstance(config.get("fl"), dict) else {}
    delta = number(privacy.get("delta")) if isinstance(privacy, dict) else None
    budget = number(privacy.get("epsilon_budget")) if isinstance(privacy, dict) else None
    return delta, budget if budget else None


def read_baselines(run_dir: Path) -> dict[str, Any]:
    """A run's baselines.json (fl.baselines), or {} when it has none or it cannot be read."""
    try:
        summary = json.loads((run_dir / "baselines.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def mark_baselines(figure: Figure, baselines: dict[str, Any]) -> None:
    """Draw a run's baselines on an accuracy figure (in %): one model on all the data and each client alone (their
    mean, and their 10th-90th percentile as a band), each at the run's compute."""
    central, mean = number(baselines.get("central_accuracy")), number(baselines.get("local_accuracy_mean"))
    low, high = number(baselines.get("local_accuracy_p10")), number(baselines.get("local_accuracy_p90"))
    epochs = number(baselines.get("central_epochs"))
    at = f", {epochs:g} epochs" if epochs is not None else ""
    rate = number(baselines.get("central_lr"))  # fl.central_lr: its own rate, not the clients'
    if central is not None:
        figure.hlines.append((100 * central, f"one model on all the data{at}{f', lr {rate:g}' if rate else ''} "
                                             f"({100 * central:.4g})"))
    if mean is not None:
        figure.hlines.append((100 * mean, f"each client alone{at}, mean ({100 * mean:.4g})"))
    if low is not None and high is not None:
        figure.bands.append((100 * low, 100 * high, "each client alone, p10-p90"))


def run_figures(name: str, records: list[dict[str, Any]], config: dict[str, Any],
                baselines: dict[str, Any] | None = None) -> dict[str, Figure]:
    """The figures a run's records support, by file stem; a figure with no data is left out. `baselines` (a run's
    baselines.json) are drawn on the accuracy figure."""
    x_key = x_key_of(records)
    xs = [x for _, x in series(records, x_key, x_key)] if x_key != RECORD_AXIS else [1, len(records)]
    x_range = (min(xs), max(xs)) if xs else None

    def by_x(title: str, y_label: str, names: list[tuple[str, str]], **kw: Any) -> Figure:
        lines = [(label, pts) for metric, label in names if (pts := series(records, metric, x_key))]
        return Figure(f"{name}: {title}", x_key, y_label, lines, x_range=x_range, **kw)

    figures = {
        "accuracy": by_x("accuracy", "accuracy (%)", [("test_accuracy", "test"), ("test_top3_accuracy", "test, top 3"),
                                                     ("fed_accuracy", "federated")], annotate_last=True),
        "loss": by_x("loss", "loss", [("train_loss", "training"), ("test_loss", "test"), ("fed_loss", "federated"),
                                      ("loss", "loss")], legend=True),  # which loss, even when alone
        "traffic": by_x("traffic", "MB so far", [("cumulative_bytes_up", "uploaded"),
                                                 ("cumulative_bytes_down", "downloaded")]),
        "participation": by_x("clients per round", "clients", [("selected", "selected"),
                                                               ("participants", "reported"), ("dropped", "dropped")],
                              integer_y=True, legend=True),
        "throughput": by_x("throughput", METRICS["samples_per_s"].label, [("samples_per_s", "samples/s")]),
    }
    if baselines and figures["accuracy"].lines:
        mark_baselines(figures["accuracy"], baselines)
    delta, budget = privacy_settings(config)
    epsilon = by_x("privacy spent" + (f" (δ = {delta:g})" if delta else ""), "ε", [("epsilon", "ε")])
    if epsilon.lines and budget:
        epsilon.hlines.append((budget, f"budget ε = {budget:g}"))
    figures["epsilon"] = epsilon
    figures["accuracy_vs_mb"] = _against(name, records, "cumulative_bytes_up", METRICS["cumulative_bytes_up"].label,
                                         "accuracy against upload")
    figures["accuracy_vs_time"] = _against(name, records, "elapsed_s", "elapsed time (s)", "accuracy against time")
    figures["accuracy_vs_sim_time"] = _against(name, records, "sim_clock_h", "simulated time (h)",
                                               "accuracy against simulated time")
    return {stem: figure for stem, figure in figures.items() if figure.lines}


def _against(name: str, records: list[dict[str, Any]], x_metric: str, x_label: str, title: str) -> Figure:
    """Test accuracy against another logged quantity (MB uploaded so far, seconds), for the records with both."""
    scale = METRICS[x_metric].scale
    points = [(x * scale, y) for r in records
              if (x := number(r.get(x_metric))) is not None and (y := number(r.get("test_accuracy"))) is not None]
    lines = [("test", [(x, y * 100) for x, y in points])] if points else []
    x_range = (0.0, max(x for x, _ in points)) if points else None  # from nothing sent (or no time) on
    return Figure(f"{name}: {title}", x_label, "test accuracy (%)", lines, integer_x=False, x_range=x_range,
                  annotate_last=True)


def plot_run(run_dir: str | Path, only: tuple[str, ...] | None = None) -> list[Path]:
    """Draw a run's figures (or those of `only`, by file stem, in that order) into RUN_DIR/plots, an SVG beside
    each PNG; returns the PNG paths."""
    run_dir = Path(run_dir)
    records, config, _ = read_run(run_dir)
    if all(k not in r for r in records for k in X_KEYS):
        raise ValueError(f"metrics in {run_dir} have none of the axis keys {X_KEYS}")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    figures = run_figures(run_dir.name, records, config, read_baselines(run_dir))
    stems = [stem for stem in only if stem in figures] if only is not None else list(figures)
    return [save_figure(out_dir / f"{stem}.png", figures[stem]) for stem in stems]


def save_figure(path: Path, figure: Figure, *, figsize: tuple[float, float] = (6.4, 4.2),
                markers_below: int = 60) -> Path:
    """Write `figure` to `path` (PNG) and beside it as SVG; returns `path`."""
    import matplotlib  # imported when a plot is drawn, not when a run starts (about 0.4 s)

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG: smaller, searchable, editable
    fig, ax = plt.subplots(figsize=figsize)
    for label, points in figure.lines:
        xs, ys = zip(*points)
        if figure.annotate_last:  # in the legend: a label beside the point would clip or overlap another
            label = f"{label} (last {ys[-1]:.4g})"
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < markers_below else None, markersize=4)
    for (y, label), colour in zip(figure.hlines, HLINE_COLOURS * len(figure.hlines)):
        ax.axhline(y, linestyle="--", color=colour, linewidth=1, label=label)
    for low, high, label in figure.bands:
        ax.axhspan(low, high, color="tab:gray", alpha=0.15, linewidth=0, label=label)
    if figure.integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if figure.integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    if figure.x_range is not None:
        low, high = figure.x_range
        pad = max((high - low) * 0.03, 0.5)  # a single round still gets an axis around it
        ax.set_xlim(low - pad, high + pad)
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)  # no "1e6" above the axis
    ax.set_xlabel(figure.x_label)
    ax.set_ylabel(figure.y_label)
    ax.set_title(figure.title)
    ax.grid(alpha=0.3)
    if figure.legend or figure.annotate_last or (figure.legend is None and len(figure.lines) + len(figure.hlines) > 1):
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path
