"""PNG plots of a run's metrics.jsonl: every numeric series against the round (or step) axis."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from plait.experiment.metrics import read_metrics  # noqa: E402

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
        xs, ys = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="." if len(xs) < 60 else None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(name)
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
