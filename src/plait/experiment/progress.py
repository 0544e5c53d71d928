"""Progress over rounds or steps: a live rich bar on a terminal; elsewhere (logs, CI, a benchmark's pipe) one plain
line when the work ends, and rich is not imported at all: 15-20 ms of a simulation's start-up (issue 13)."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _Bar:
    def __init__(self, progress: Any, task: Any, total: int, done: int = 0):
        self._progress, self._task, self.total = progress, task, total
        self.done, self.status = done, ""

    def advance(self, done: int, status: str = "") -> None:
        self.done, self.status = done, status
        if self._progress is not None:
            self._progress.update(self._task, completed=done, status=status)


@contextmanager
def progress_bar(description: str, total: int, start: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None, total)
        return
    if not sys.stdout.isatty():  # a live bar would print only its last state anyway
        started = time.monotonic()
        bar = _Bar(None, None, total, start)
        try:
            yield bar
        finally:
            elapsed = datetime.timedelta(seconds=round(time.monotonic() - started))
            print(f"{description} {bar.done}/{total} in {elapsed}" + (f", {bar.status}" if bar.status else ""),
                  flush=True)
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
