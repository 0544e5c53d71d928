"""Progress off a terminal: no live bar and no rich, a plain line at most a minute while the work goes on and one
when it ends (where it got to, the time, the last status)."""

from __future__ import annotations

import re

import pytest

from plait.experiment.progress import progress_bar


def test_off_a_terminal_progress_is_one_line_at_the_end(capsys):
    with progress_bar("rounds", total=5, start=1) as bar:
        assert capsys.readouterr().out == "rounds: going on from 1/5\n"  # resumed work says so; then nothing
        bar.advance(3, "acc 0.9100")
        assert capsys.readouterr().out == ""
    assert re.fullmatch(r"rounds 3/5 in 0:00:0\d, acc 0\.9100\n", capsys.readouterr().out)
    with pytest.raises(RuntimeError), progress_bar("steps", total=4) as bar:
        raise RuntimeError("the run failed")  # where it stopped is still said
    assert capsys.readouterr().out.startswith("steps 0/4 in ")
    with progress_bar("steps", total=4, enabled=False) as bar:
        bar.advance(4)
    assert capsys.readouterr().out == ""


def test_long_work_off_a_terminal_says_where_it_is_every_so_often(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("plait.experiment.progress.time.monotonic", lambda: clock[0])
    with progress_bar("epochs", total=10) as bar:
        bar.advance(1)
        clock[0] += 59
        bar.advance(2)
        assert capsys.readouterr().out == ""  # under a minute since the start: nothing yet
        clock[0] += 1
        bar.advance(3)
        assert capsys.readouterr().out == "epochs 3/10 in 0:01:00\n"
        clock[0] += 30
        bar.advance(4)
        assert capsys.readouterr().out == ""  # half a minute since the last line
    assert capsys.readouterr().out == "epochs 4/10 in 0:01:30\n"
    with progress_bar("epochs", total=2) as bar:
        clock[0] += 60
        bar.advance(2)
        assert capsys.readouterr().out == "epochs 2/2 in 0:01:00\n"
    assert capsys.readouterr().out == ""  # the end said nothing new: not said twice
