"""The driver above the planes: run directories, resume, metric sinks, progress, plots, comparison of runs, and
the planes' runs (`runs/`).

    from plait.experiment import run_federated     # a federated simulation in its run directory

The runs are imported when first named, so that `plait plot` and `plait compare` load no plane."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.experiment.runs.fl_simulation import RunSummary, run_federated

__all__ = ["RunSummary", "run_federated"]
_LAZY = {"RunSummary": "plait.experiment.runs.fl_simulation", "run_federated": "plait.experiment.runs.fl_simulation"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'plait.experiment' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
