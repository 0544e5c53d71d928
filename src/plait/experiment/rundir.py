"""The run directory `runs/<name>/`: resolved config, metrics.jsonl, checkpoints, plots."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from plait.runtime.checkpoint import CHECKPOINT_FILE
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import to_dict


@dataclass(frozen=True, slots=True)
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def write_pid(self, rank: int) -> None:
        """ranks/rank<r>.pid, this process's id: lets an operator (or a test) kill one rank of a run."""
        pid_dir = self.path / "ranks"
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))

    def write_config(self, config: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = config if isinstance(config, dict) else to_dict(config)
        self.config_path.write_bytes(tomli_w.dumps(data).encode("utf-8"))


def prepare_run_dir(root: str | Path, name: str, resume: bool, fresh_name: bool = False) -> RunDir:
    """A fresh `root/name`, or the one to resume. An existing run is an error, unless `fresh_name` asks for the
    first free `name-2`, `name-3`, ... instead (the demo does, so it can be run again)."""
    run = RunDir(Path(root) / name)
    if fresh_name and not resume:
        suffix = 2
        while RunDir(run.path).metrics_path.exists() or RunDir(run.path).checkpoint_path.exists():
            run = RunDir(Path(root) / f"{name}-{suffix}")
            suffix += 1
    stopped_early = f"it stopped before its first checkpoint: delete {run.path} to start it again, or use another " \
                    "run.name"
    if resume:
        if not run.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {run.checkpoint_path}"
                                    + (f" ({stopped_early})" if read_metrics(run.metrics_path) else ""))
    elif run.checkpoint_path.exists():
        raise FileExistsError(f"run directory {run.path} already holds a run; use --resume or another run.name")
    elif read_metrics(run.metrics_path):  # a run killed before any record starts again; one with records is kept
        raise FileExistsError(f"run directory {run.path} already holds a run, and {stopped_early}")
    run.path.mkdir(parents=True, exist_ok=True)
    return run
