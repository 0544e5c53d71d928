"""PNG plots of a run's metrics.jsonl: every numeric series against the round (or step) axis."""

from __future__ import annotations

from pathlib import Path

from plait.experiment.metrics import read_metrics

# Series drawn when present, each in its own PNG; the x axis is the first of these keys the records carry.
DEFAULT_SERIES = ("accuracy", "loss", "train_loss", "samples_per_s", "bytes_up", "bytes_down", "epsilon")
X_KEYS = ("round", "step", "clock")


def plot_run(run_dir: str | Path, series: tuple[str, ...] = DEFAULT_SERIES) -> list[Path]:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir / 'metrics.jsonl'}")
    x_key = next((k for r in records for k in X_KEYS if k in r), None)  # the first line may be an event
    if x_key is None:
        raise ValueError(f"metrics in {run_dir} have none of the axis keys {X_KEYS}")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name in series:
        points = [(r[x_key], r[name]) for r in records if isinstance(r.get(name), (int, float)) and x_key in r]
        if not points:
            continue
        path = out_dir / f"{name}.png"
        save_line_plot(path, [(name, points)], x_key, name, title=f"{run_dir.name}: {name}")
        written.append(path)
    return written


def save_line_plot(path: Path, lines: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str, *,
                   title: str | None = None, legend: bool = False, figsize: tuple[float, float] = (6, 4),
                   markers_below: int = 60) -> None:
    """One PNG with a line per (label, points); short lines get a marker on every point."""
    import matplotlib  # imported when a plot is drawn, not when a run starts (about 0.4 s)

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, points in lines:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, marker="." if len(xs) < markers_below else None)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
