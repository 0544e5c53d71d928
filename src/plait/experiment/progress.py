"""A rich progress bar over rounds or steps, silent when output is not a terminal (tests, CI logs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task, total: int):
        self._progress, self._task, self.total = progress, task, total

    def advance(self, done: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, status=status)


@contextmanager
def progress_bar(description: str, total: int, start: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None, total)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=start, status="")
        yield _Bar(progress, task, total)
