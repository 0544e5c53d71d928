"""SIGTERM and SIGINT during a parameter-server run, caught as a flag the coordinator's loop reads between its steps
(coordinator.py): the run then stops its workers, asks the servers for final checkpoints and returns.

The handler only records the signal. One that raised an exception instead would throw it into whatever the main
thread was doing at that instant, often the middle of a library's critical section, and leave it half done: an event
queued in tensorboard's writer with the writer thread never woken (the next flush then blocks for the writer's
flush_secs, 120 s), or subprocess's waitpid lock never released (the next wait() blocks for good). A signalled
launcher once outlived its shutdown that way, its servers still running.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.signum` is the first of SIGTERM or SIGINT received, else None. Only
    the main thread can set handlers: elsewhere nothing is caught (and `signum` stays None)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # what each signal's handler was before

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:  # the first names the stop; a second one, mid-shutdown, changes nothing
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # None: the handler before was not set from Python; the default is the closest to it
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
