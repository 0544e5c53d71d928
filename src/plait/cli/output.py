"""What the `plait` command prints: results on stdout, warnings and errors on stderr (an error is one line, whatever
the terminal), and the exit code of a failure (2: bad usage or config, 1: the run started and failed).

rich, which draws the colours and tables, is imported at the first print rather than with the command: a run prints
when it ends, so its 40 ms of imports stay out of the start-up (benchmarks/RESULTS.md, issue 13).
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from rich.console import Console

    from plait.experiment.compare import Comparison


OFF_TERMINAL_WIDTH = 400  # columns for output to a file or a pipe


@cache
def console(stderr: bool = False) -> Console:
    """The console for stdout (or stderr). It writes to whatever sys.stdout (sys.stderr) is at each print, so a
    caller that redirects them (a test) sees the output."""
    from rich.console import Console

    # soft wrap (lines as they are) for errors and off a terminal: a log's line is not cut at 80 columns, and off a
    # terminal a table (plait compare's) is as wide as its cells, not squeezed into rich's default 80
    terminal = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, soft_wrap=stderr or not terminal, width=None if terminal else OFF_TERMINAL_WIDTH)


def say(text: str, stderr: bool = False) -> None:
    """Print `text`, which may carry rich's markup ([bold]...[/])."""
    console(stderr).print(text)


def warn_in_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: object = None, line: str | None = None) -> None:
    """`warnings.showwarning` for the command: `warning: message` on stderr, as errors are said, without the file,
    line and source that Python's format adds (they speak to a developer, not to the user of a command)."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"warning: {message}{kind}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise SystemExit(code)


def show_comparison(result: Comparison) -> None:
    """`plait compare`'s report of a Comparison: the settings that differ, a table of them with the headline
    figures (compare.md has every column), the files written."""
    from rich.table import Table

    from plait.experiment.compare import HEADLINE, format_cell

    if result.note:
        say(result.note)
    say("settings that differ: " + (", ".join(result.settings) if result.settings else "none"))
    table = Table()
    columns = [c for c in dict.fromkeys(k for row in result.rows for k in row)
               if c == "run" or c in result.settings or c in HEADLINE or (c == "plane" and result.note)]
    for column in columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(format_cell(row.get(c)) for c in columns))
    console().print(table)
    for path in result.files:
        say(f"written: {path}")
