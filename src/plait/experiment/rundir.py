"""The run directory `runs/<name>/`: resolved config, metrics.jsonl, checkpoints, plots."""

from __future__ import annotations

import os
import sys
import tomllib
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


# What makes a run the experiment it is: a resume with another value would log two experiments as one. Every
# [model] key (the architecture: name, factory, options, a preset's depth or width), and the [data] keys that choose
# the examples and who holds them; not where the same data lies (path, cache_dir) nor how it is batched.
EXPERIMENT_DATA_KEYS = ("data.name", "data.source", "data.test_path", "data.partition", "data.num_clients",
                        "data.alpha", "data.shards_per_client", "data.seed", "data.eval_fraction",
                        "data.max_examples_per_client", "data.examples_per_client", "data.test_examples")


def is_experiment_key(key: str) -> bool:
    return key.startswith("model.") or key in EXPERIMENT_DATA_KEYS


def _flat(table: dict[str, Any], where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and f"{where}{key}" != "model.options":
            out.update(_flat(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def changed_settings(run: RunDir, config: Any) -> dict[str, tuple[Any, Any]]:
    """The settings a resume changes against the run directory's config.toml: {key: (before, now)}. A change of
    an experiment setting (is_experiment_key) is an error (start another run.name); nothing when the directory has
    no config."""
    if not run.config_path.exists():
        return {}
    before = _flat(tomllib.loads(run.config_path.read_text(encoding="utf-8")))
    now = _flat(config if isinstance(config, dict) else to_dict(config))
    # a key only one side has is not compared: a run whose config predates a setting ran as its default does
    changed = {key: (before[key], now[key]) for key in sorted(set(before) & set(now)) if before[key] != now[key]}
    fixed = {key: change for key, change in changed.items() if is_experiment_key(key)}
    if fixed:
        said = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in fixed.items())
        raise ValueError(f"--resume with another experiment ({said}): its records would mix two experiments in "
                         f"{run.path}; resume with the run's settings (its config.toml), or start another run.name")
    return changed


def check_resumed_settings(run: RunDir, config: Any) -> None:
    """Before a resume touches `run`: another experiment refused (changed_settings), other changes said on stderr
    in one line (more steps, a new rate), as the run goes on with them."""
    changed = changed_settings(run, config)
    if changed:
        print("note: resumed with changed settings: " + ", ".join(
            f"{key} {old!r} → {new!r}" for key, (old, new) in changed.items()), file=sys.stderr)


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
