"""Config sections every plane shares. Each plane subclasses them to set its own defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class RunSection:
    """`[run]`: the run directory `root/name`, the seed, and torch threads per process."""

    name: str = "run"
    root: str = "runs"
    seed: int = 0
    threads: int = 0            # torch threads per process (0: torch's default)
    tensorboard: bool = True    # also write TensorBoard event files to the run's tb/ (metrics.jsonl and .csv always)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.threads < 0:
            raise ValueError(f"run.threads must be >= 0, got {self.threads}")


@dataclass(kw_only=True, slots=True)
class ImageModelSection:
    """`[model]` of the cluster planes (data parallel, parameter server): a FedAvg-paper image model."""

    name: Literal["2nn", "cnn"] = "2nn"
