"""A worker's step that diverged: a non-finite loss or gradient is caught before it is pushed (the servers refuse
non-finite pushes anyway, and name an update that overflows, server.py), so the servers' state stays good.

With `train.on_divergence = "stop"` (the default) the worker writes a `diverged` record naming the step, itself and
the reason to worker-<rank>.jsonl and exits 1; the local launcher, seeing that record, stops the run: the servers'
final checkpoints are the last good state and `--resume` goes on from them. With "skip" the step is skipped
(`KVStore.skip`: its clock counts as pushed with nothing) unless the weights themselves are not finite: then no
step can be good and the run stops either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plait.core.finite import all_finite
from plait.runtime.divergence import Diverged
from plait.runtime.metrics_log import read_metrics


class WorkerDiverged(Diverged):
    """A worker's non-finite loss or gradient stopped the run (the message names the step, the worker and the
    reason; the launcher adds where the last good checkpoints are): the one `Diverged` of every plane."""


def step_problem(loss: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> tuple[str, bool] | None:
    """(what is not finite, whether skipping the step can help), or None for a good step. One host sync."""
    if all_finite(grad) and all_finite(loss):
        return None
    if not all_finite(weights):
        return "the weights pulled from the servers are not finite (a server's update overflowed: see its log)", False
    what = "train loss" if not bool(torch.isfinite(loss)) else "gradient"
    return f"{what} not finite (train loss {float(loss)})", True


def divergence_record(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """The `diverged` record a worker that stopped the run wrote last, or None (it died of something else)."""
    records = read_metrics(Path(run_dir) / f"worker-{rank}.jsonl")
    return records[-1] if records and records[-1].get("event") == "diverged" else None
