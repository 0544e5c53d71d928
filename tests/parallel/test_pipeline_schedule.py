"""Schedules as data: action lists, dry run (bubble, in-flight peaks), and broken schedules it must catch."""

from __future__ import annotations

import pytest
import torch

from plait.parallel.pipeline.schedule import (
    Action,
    DeadlockError,
    Schedule,
    ScheduleError,
    bubble_theory,
    build_schedule,
    dry_run,
    forward_only,
    gpipe,
    one_f_one_b,
)


def _row(text: str, stage: int) -> tuple[Action, ...]:
    return tuple(Action(stage, tok[0], int(tok[1:])) for tok in text.split())


def test_gpipe_and_1f1b_action_lists():
    assert gpipe(2, 3).actions == (_row("F0 F1 F2 B0 B1 B2", 0), _row("F0 F1 F2 B0 B1 B2", 1))
    assert one_f_one_b(3, 4).actions == (
        _row("F0 F1 F2 B0 F3 B1 B2 B3", 0),
        _row("F0 F1 B0 F2 B1 F3 B2 B3", 1),
        _row("F0 B0 F1 B1 F2 B2 F3 B3", 2),
    )
    # fewer micro-batches than stages: warm-up is capped by m
    assert one_f_one_b(4, 2).actions[0] == _row("F0 F1 B0 B1", 0)
    text = str(one_f_one_b(2, 2))
    assert "stage 0: F0 F1 B0 B1" in text and "stage 1: F0 B0 F1 B1" in text


@pytest.mark.parametrize("stages,micro", [(1, 1), (2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (4, 2)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_dry_run_bubble_matches_theory(name, stages, micro):
    run = dry_run(build_schedule(name, stages, micro))
    assert run.bubble == pytest.approx(bubble_theory(stages, micro), abs=1e-12)
    assert run.makespan == pytest.approx((micro + stages - 1) * 3.0)  # F=1, B=2 per micro-batch
    expected_peaks = [micro] * stages if name == "gpipe" else [min(stages - s, micro) for s in range(stages)]
    assert list(run.peak_in_flight) == expected_peaks


def test_timeline_printout():
    lines = dry_run(gpipe(2, 2)).format_timeline().splitlines()
    # stage 1 starts one forward later; a backward takes two time units; stage 0 waits for stage 1's B0
    assert lines == ["stage 0: F0 F1 .. .. .. B0 B0 B1 B1", "stage 1: .. F0 F1 B0 B0 B1 B1 .. .."]


def test_dry_run_catches_mismatched_order():
    good = gpipe(2, 3)
    swapped = list(good.actions[1])
    swapped[0], swapped[1] = swapped[1], swapped[0]   # stage 1: F1 F0 F2 ..., but stage 0 sends micro-batch 0 first
    broken = Schedule("broken", 2, 3, (good.actions[0], tuple(swapped)))
    with pytest.raises(ScheduleError,
                       match=r"mismatched send/recv order on stage 1.*micro-batch 1.*sent micro-batch 0"):
        dry_run(broken)


def test_dry_run_catches_deadlock():
    # stage 0 waits for micro-batch 0's gradient before sending micro-batch 1; stage 1 waits for micro-batch 1
    broken = Schedule("eager-backward", 2, 2, (_row("F0 B0 F1 B1", 0), _row("F0 F1 B0 B1", 1)))
    with pytest.raises(DeadlockError, match="stage 0 at B0 waits .* stage 1 at F1 waits"):
        dry_run(broken)


def test_dry_run_rejects_malformed_schedules():
    with pytest.raises(ScheduleError, match="stage 1: missing actions B1"):
        dry_run(Schedule("short", 2, 2, (_row("F0 F1 B0 B1", 0), _row("F0 F1 B0", 1))))
    with pytest.raises(ScheduleError, match="backward before its forward"):
        dry_run(Schedule("early", 1, 1, (_row("B0 F0", 0),)))
    with pytest.raises(ScheduleError, match="appears twice"):
        dry_run(Schedule("twice", 1, 1, (_row("F0 F0 B0", 0),)))
    with pytest.raises(ValueError, match="parallel.schedule"):
        build_schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="parallel.micro_batches"):
        gpipe(2, 0)


def test_forward_only_schedule():
    run = dry_run(forward_only(3, 4), forward_cost=1.0)
    assert run.makespan == pytest.approx(6.0)  # m + p - 1 forwards
    assert all(a.kind == "F" for row in run.schedule.actions for a in row)
    assert run.peak_in_flight == (0, 0, 0)


def test_receive_plan_rejects_zero_depth_and_skips_actions_without_messages():
    from plait.parallel.pipeline.comm import RecvAhead

    with pytest.raises(ValueError, match="depth"):
        RecvAhead([None], depth=0, device=torch.device("cpu"))
    # a first stage's forwards receive nothing: no receive is posted
    recvs = RecvAhead([None, None], device=torch.device("cpu"))
    assert recvs.get(0) is None and recvs.get(1) is None
