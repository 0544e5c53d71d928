"""The run a plane is handed: where its state lives and where its records go.

The experiment driver (`plait.experiment.run.Run`) owns the run directory, resume, the metric sinks (JSONL, CSV,
TensorBoard), the checkpoint cadence and the progress bar; a plane sees only this interface and never opens the
run directory itself. A process that does not write the run's records (a rank other than 0) is handed a run whose
`writes` is False: its `write`, `save` and `progress` do nothing, but `path`, `resume` and `load` still work, for
the plane's own per-rank state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class RecordSink(Protocol):
    """Where one record per step or round goes."""

    def write(self, record: dict[str, Any]) -> None: ...


class RunContext(RecordSink, Protocol):
    @property
    def path(self) -> Path:
        """The run directory: a plane may keep state files of its own in it (per-rank checkpoints, logs)."""
        ...

    @property
    def resume(self) -> bool:
        """True when this run goes on from its checkpoint."""
        ...

    @property
    def writes(self) -> bool:
        """True in the process that writes the run's records, checkpoint and plots."""
        ...

    def load(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (None on a fresh run)."""
        ...

    def start(self, step: int) -> float:
        """Records after `step` are (re)written from here on: on resume the log keeps those up to `step` (the
        checkpoint's). Returns the seconds the run had trained before, so that `elapsed_s` goes on."""
        ...

    def due(self, step: int, *, final: bool = False) -> bool:
        """Whether a checkpoint at `step` is due by the run's cadence (or `final`). Every process gets the same answer,
        writer or not: a plane that gathers its state collectively (every rank sends its part) asks this first."""
        ...

    def save(self, step: int, state: Callable[[], dict[str, Any]], *, final: bool = False) -> bool:
        """Checkpoint `state()` atomically if `step` is due by the run's cadence (or `final`); True if saved."""
        ...

    def progress(self, done: int, status: str = "") -> None:
        """Steps or rounds done so far, with a short status for the progress bar."""
        ...

    def save_model(self, state_dict: dict[str, Any]) -> None:
        """The final model's `state_dict` as the run's `model.safetensors` (in the process that writes)."""
        ...
