"""What becomes of a worker process that ended: the one restart policy of the local launcher (launcher.py) and of a
worker's torchrun rank (torchrun_roles.py).

    exit code 0                      -> DONE      it trained its last step
    its last record says `diverged`  -> DIVERGED  never restarted (it would diverge again at the same step): the run
                                                  stops, the servers' final checkpoints hold the last good state
    any other exit, restarts left    -> RESTART   (sync.max_worker_restarts per worker) it resumes at the clock the
                                                  servers hold for it
    any other exit, none left        -> FAILED    the others go on without it
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from plait.ps.divergence import divergence_record


class Outcome(Enum):
    DONE = "done"
    DIVERGED = "diverged"
    RESTART = "restart"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    diverged: dict[str, Any] | None = None  # with DIVERGED: the worker's `diverged` record (step, reason, ...)


class WorkerRestartPolicy:
    """Counts each worker's restarts (`restarts[worker]`, the number its next life is started with) and decides, from
    an exit code and the worker's records in `run_dir`, what follows."""

    def __init__(self, max_restarts: int, num_workers: int, run_dir: Path):
        self.max_restarts, self.run_dir = max_restarts, Path(run_dir)
        self.restarts = [0] * num_workers

    def after_exit(self, worker: int, exit_code: int) -> Decision:
        if exit_code == 0:
            return Decision(Outcome.DONE)
        if (diverged := divergence_record(self.run_dir, worker)) is not None:
            return Decision(Outcome.DIVERGED, diverged)
        if self.restarts[worker] < self.max_restarts:
            self.restarts[worker] += 1
            return Decision(Outcome.RESTART)
        return Decision(Outcome.FAILED)
