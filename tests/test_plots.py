"""`plot_run` on logs as the planes write them: the x axis comes from whichever record carries it."""

from __future__ import annotations

import json

import pytest

from plait.experiment.plots import plot_run


def test_a_log_that_starts_with_an_event_still_plots(tmp_path):
    # a PS run whose worker died before the first evaluation: its log opens with the launcher's event
    records = [{"event": "worker_restarted", "worker": 1, "exit_code": 3},
               {"step": 1, "loss": 2.0, "accuracy": 0.1}, {"step": 2, "loss": 1.5, "accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_run(tmp_path, ("loss", "accuracy"))
    assert [p.name for p in written] == ["loss.png", "accuracy.png"] and all(p.stat().st_size > 0 for p in written)


def test_a_log_without_any_axis_key_is_refused_by_name(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the axis keys"):
        plot_run(tmp_path)
