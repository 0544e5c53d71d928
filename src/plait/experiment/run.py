"""The experiment driver's side of a run (`plait.runtime.context.RunContext`): it owns the run directory, resume
(the log is cut back to the checkpoint, `elapsed_s` goes on), the metric sinks, the checkpoint cadence and the
progress bar. Every plane's run is driven through one of these; the planes never open the run directory."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir, check_resumed_settings
from plait.experiment.sinks import MetricSinks
from plait.runtime.checkpoint import load_checkpoint, save_checkpoint, save_weights_file
from plait.runtime.metrics_log import elapsed_so_far, truncate_metrics


class Run:
    """One run directory driven for a plane; `writes=False` for a process whose records another one writes. The
    run's `config` goes into its `config.toml` when the run starts: after a resumed checkpoint was loaded and found
    to fit, so a refused resume leaves the directory's settings as they were."""

    def __init__(self, run_dir: RunDir, *, resume: bool, step_key: str, total: int, description: str,
                 writes: bool = True, checkpoint_every: int = 1, tensorboard: bool = True,
                 show_progress: bool = True, config: Any = None):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.run_dir, self.step_key, self.total, self.description = run_dir, step_key, total, description
        self._resume, self._writes = resume, writes
        self.checkpoint_every, self.tensorboard, self.show_progress = checkpoint_every, tensorboard, show_progress
        self._config = config
        self._stack = ExitStack()
        self._sinks: MetricSinks | None = None
        self._bar: Any = None

    @property
    def path(self) -> Path:
        return self.run_dir.path

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir.checkpoint_path

    @property
    def resume(self) -> bool:
        return self._resume

    @property
    def writes(self) -> bool:
        return self._writes

    def load(self) -> dict[str, Any] | None:
        return load_checkpoint(self.checkpoint_path) if self._resume else None

    def start(self, step: int) -> float:
        if self._sinks is not None:
            raise RuntimeError("Run.start was called twice")
        if self._resume and self._writes and self._config is not None:  # before the log is touched
            check_resumed_settings(self.run_dir, self._config)
        elapsed = 0.0
        if self._resume:
            if self._writes:
                truncate_metrics(self.run_dir.metrics_path, self.step_key, step)  # steps after it are redone once
            elapsed = elapsed_so_far(self.run_dir.metrics_path)
        if self._writes:
            if self._config is not None:
                self.run_dir.write_config(self._config)  # a resume's too: the settings the run goes on with
            self._sinks = self._stack.enter_context(MetricSinks(
                self.path, self.step_key, resume_after=step if self._resume else None, tensorboard=self.tensorboard))
            self._bar = self._stack.enter_context(
                progress_bar(self.description, self.total, step, self.show_progress))
        return elapsed

    def write(self, record: dict[str, Any]) -> None:
        if self._sinks is not None:
            self._sinks.write(record)

    def due(self, step: int, *, final: bool = False) -> bool:
        return final or step % self.checkpoint_every == 0

    def save(self, step: int, state: Callable[[], dict[str, Any]], *, final: bool = False) -> bool:
        if not self._writes or not self.due(step, final=final):
            return False
        save_checkpoint(self.checkpoint_path, state())
        return True

    def save_model(self, state_dict: dict[str, Any]) -> None:
        if self._writes:
            save_weights_file(self.path, state_dict)

    def progress(self, done: int, status: str = "") -> None:
        if self._bar is not None:
            self._bar.advance(done, status)

    def close(self) -> None:
        self._stack.close()
        self._sinks = self._bar = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
