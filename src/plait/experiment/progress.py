"""Progress over rounds or steps: a live rich bar on a terminal; elsewhere (logs, CI, a benchmark's pipe) plain
lines: where resumed work goes on from, one at most every PLAIN_EVERY_S while it goes on and one when it ends (unless
the last said the same), and rich is not imported at all: 15-20 ms of a simulation's start-up (issue 13)."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PLAIN_EVERY_S = 60.0  # a log's line while long work goes on (a baseline's hour would otherwise say nothing)


class _Bar:
    def __init__(self, progress: Any, task: Any, total: int, done: int = 0, plain: str | None = None):
        self._progress, self._task, self.total = progress, task, total
        self.done, self.status = done, ""
        self._plain, self._started = plain, time.monotonic()  # plain: the description of a bar printed as lines
        self._printed, self._printed_done = self._started, done
        if plain is not None and done:  # a resumed run's work: say where it goes on from
            print(f"{plain}: going on from {done}/{total}", flush=True)

    def advance(self, done: int, status: str = "") -> None:
        self.done, self.status = done, status
        if self._progress is not None:
            self._progress.update(self._task, completed=done, status=status)
        elif self._plain is not None and time.monotonic() - self._printed >= PLAIN_EVERY_S:
            self._printed, self._printed_done = time.monotonic(), done
            print(self.line(), flush=True)

    def finish(self) -> None:
        """The last line of a bar printed as lines, unless the last periodic one said the same."""
        if self._plain is not None and (self.done != self._printed_done or self._printed == self._started):
            print(self.line(), flush=True)

    def line(self) -> str:
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self._started))
        return f"{self._plain} {self.done}/{self.total} in {elapsed}" + (f", {self.status}" if self.status else "")


@contextmanager
def progress_bar(description: str, total: int, start: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None, total)
        return
    if not sys.stdout.isatty():  # a live bar would print only its last state anyway
        bar = _Bar(None, None, total, start, plain=description)
        try:
            yield bar
        finally:
            bar.finish()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=start, status="")
        yield _Bar(progress, task, total, start)
