"""Progress off a terminal: no live bar and no rich, one plain line when the work ends (where it got to, the time,
the last status)."""

from __future__ import annotations

import re

import pytest

from plait.experiment.progress import progress_bar


def test_off_a_terminal_progress_is_one_line_at_the_end(capsys):
    with progress_bar("rounds", total=5, start=1) as bar:
        assert capsys.readouterr().out == ""  # nothing while the work goes on
        bar.advance(3, "acc 0.9100")
    assert re.fullmatch(r"rounds 3/5 in 0:00:0\d, acc 0\.9100\n", capsys.readouterr().out)
    with pytest.raises(RuntimeError), progress_bar("steps", total=4) as bar:
        raise RuntimeError("the run failed")  # where it stopped is still said
    assert capsys.readouterr().out.startswith("steps 0/4 in ")
    with progress_bar("steps", total=4, enabled=False) as bar:
        bar.advance(4)
    assert capsys.readouterr().out == ""
