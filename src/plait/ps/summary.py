"""What a parameter-server run hands back to its driver when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(slots=True)
class ClusterSummary:
    run_dir: Path
    elapsed_s: float
    final: dict[str, Any]
    time_to_target_s: float | None
    server_restarts: int
    failed_workers: list[int]
    max_staleness: dict[int, int]
    weights: np.ndarray = field(repr=False)
    worker_restarts: dict[int, int] = field(default_factory=dict)  # rank -> restarts, for those restarted
    stopped_by: str | None = None  # "SIGTERM" or "SIGINT" when a signal ended the run early


def test_metrics_text(record: dict[str, Any]) -> str:
    """A record's test metrics as text, "loss 0.1234, accuracy 0.9876" (a regression run has no accuracy; a run
    without a test set has neither: "")."""
    parts = [f"{label} {record[key]:.4f}" for key, label in (("test_loss", "loss"), ("test_accuracy", "accuracy"))
             if key in record]
    return ", ".join(parts)
