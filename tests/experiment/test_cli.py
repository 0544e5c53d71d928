"""The command line: one library, `plait --version`, errors on stderr, exit 2 for bad usage or config."""

from __future__ import annotations

import subprocess
import sys

from plait import __version__


def _plait(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_and_exit_codes(tmp_path):
    assert _plait("--version").stdout.strip() == f"plait {__version__}"
    missing = _plait("run", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "error" not in missing.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[fl]\nrounds = 0\n")
    result = _plait("run", str(bad))
    assert result.returncode == 2 and "fl.rounds must be >= 1" in result.stderr


def test_a_long_line_stays_one_line_off_a_terminal():
    code = ("from plait.cli.output import say; say('baselines at 2 epochs: ' + 'word ' * 40 + '[bold]end[/]'); "
            "say('two words')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines() == ["baselines at 2 epochs: " + "word " * 40 + "end", "two words"]  # not cut at 80



def test_a_table_off_a_terminal_keeps_its_rows_whole():
    import contextlib
    import io

    from rich.table import Table

    from plait.cli.output import console

    out = io.StringIO()
    console.cache_clear()  # the console is made for what stdout is at its first print: here, not a terminal
    try:
        with contextlib.redirect_stdout(out):
            table = Table("run", "a setting with a long name", "another setting with a long name", "final accuracy")
            table.add_row("a-run-with-a-long-name", "0.0001", "dirichlet-with-alpha-0.5", "0.98765")
            console().print(table)
    finally:
        console.cache_clear()
    rows = [line for line in out.getvalue().splitlines() if "a-run-with-a-long-name" in line]
    assert len(rows) == 1 and "0.98765" in rows[0] and "dirichlet-with-alpha-0.5" in rows[0]
