"""Pipeline schedules as data: per-stage lists of actions (stage, F/B, micro-batch), printable, and a dry run.

The runtime (stage.py) executes exactly these lists. Its communication rules, which the dry run mirrors:
- a forward on stage s > 0 first receives micro-batch k's activation from s-1; a forward on s < p-1 then sends its
  output to s+1;
- a backward on stage s < p-1 first receives micro-batch k's output gradient from s+1; a backward on s > 0 then
  sends its input gradient to s-1;
- sends are non-blocking (isend), receives block, and messages on each (sender, receiver) channel are matched in
  order (as NCCL does; no tags), so a receiver must expect micro-batches in the order the sender sent them.
`dry_run` replays all stages against these rules with abstract costs, before any process runs. It raises
`ScheduleError` for a malformed schedule or a mismatched send/recv order, `DeadlockError` when every unfinished stage
waits on a message that can never come; otherwise it returns the simulated timeline, bubble and in-flight peaks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]


class ScheduleError(ValueError):
    """A schedule that cannot run correctly; the message names the stage and the action."""


class DeadlockError(ScheduleError):
    """Every unfinished stage waits on a receive that no stage will ever send."""


@dataclass(frozen=True, slots=True)
class Action:
    stage: int
    kind: Kind
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    num_stages: int
    num_micro_batches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[s]: what stage s does, in order
    forward_only: bool = False

    def __str__(self) -> str:
        head = f"{self.name}: {self.num_stages} stages, {self.num_micro_batches} micro-batches"
        rows = [f"  stage {s}: " + " ".join(str(a) for a in acts) for s, acts in enumerate(self.actions)]
        return "\n".join([head, *rows])


def _check_sizes(num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1:
        raise ValueError(f"parallel.stages must be >= 1, got {num_stages}")
    if num_micro_batches < 1:
        raise ValueError(f"parallel.micro_batches must be >= 1, got {num_micro_batches}")


def gpipe(num_stages: int, num_micro_batches: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019): every stage holds all m micro-batches' activations."""
    _check_sizes(num_stages, num_micro_batches)
    m = num_micro_batches
    acts = tuple(tuple([Action(s, "F", k) for k in range(m)] + [Action(s, "B", k) for k in range(m)])
                 for s in range(num_stages))
    return Schedule("gpipe", num_stages, m, acts)


def one_f_one_b(num_stages: int, num_micro_batches: int) -> Schedule:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): p-1-s warm-up forwards, then alternate one forward and one
    backward, then drain. Same bubble as GPipe, but stage s holds at most p-s micro-batches' activations, not m."""
    _check_sizes(num_stages, num_micro_batches)
    m = num_micro_batches
    rows = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, m)
        row = [Action(s, "F", k) for k in range(warmup)]
        for i in range(m - warmup):
            row += [Action(s, "F", warmup + i), Action(s, "B", i)]
        row += [Action(s, "B", k) for k in range(m - warmup, m)]
        rows.append(tuple(row))
    return Schedule("1f1b", num_stages, m, tuple(rows))


def forward_only(num_stages: int, num_micro_batches: int) -> Schedule:
    """Pipelined inference: every stage forwards micro-batches 0..m-1 as they arrive."""
    _check_sizes(num_stages, num_micro_batches)
    acts = tuple(tuple(Action(s, "F", k) for k in range(num_micro_batches)) for s in range(num_stages))
    return Schedule("forward", num_stages, num_micro_batches, acts, forward_only=True)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, num_stages: int, num_micro_batches: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule = {name!r} is not known; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_stages, num_micro_batches)


def bubble_theory(num_stages: int, num_micro_batches: int) -> float:
    """(p-1)/(m+p-1): the idle share of a synchronous pipeline with equal stages and free communication."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


@dataclass(frozen=True, slots=True)
class Interval:
    action: Action
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class DryRun:
    schedule: Schedule
    timeline: tuple[tuple[Interval, ...], ...]  # per stage, in execution order
    makespan: float
    bubble: float                                 # 1 - busy / (stages × makespan)
    peak_in_flight: tuple[int, ...]               # per stage: most micro-batches forwarded, not yet backwarded

    def format_timeline(self, unit: float = 1.0) -> str:
        """One row per stage, one column per `unit` of simulated time: 'F3', 'B0' or '..' (idle)."""
        cols = max(1, round(self.makespan / unit))
        lines = []
        for s, row in enumerate(self.timeline):
            cells = [".."] * cols
            for iv in row:
                for c in range(round(iv.start / unit), round(iv.end / unit)):
                    cells[c] = f"{iv.action.kind}{iv.action.micro_batch}"[:2].ljust(2)
            lines.append(f"stage {s}: " + " ".join(cells))
        return "\n".join(lines)


def _validate(schedule: Schedule) -> None:
    p, m = schedule.num_stages, schedule.num_micro_batches
    if len(schedule.actions) != p:
        raise ScheduleError(f"schedule {schedule.name!r} has {len(schedule.actions)} stage rows, expected {p}")
    kinds = ("F",) if schedule.forward_only else ("F", "B")
    for s, row in enumerate(schedule.actions):
        seen: set[tuple[str, int]] = set()
        for action in row:
            where = f"schedule {schedule.name!r}, stage {s}, action {action}"
            if action.stage != s:
                raise ScheduleError(f"{where}: belongs to stage {action.stage}")
            if action.kind not in kinds or not 0 <= action.micro_batch < m:
                raise ScheduleError(f"{where}: not a valid action for {m} micro-batches ({'/'.join(kinds)})")
            if (action.kind, action.micro_batch) in seen:
                raise ScheduleError(f"{where}: appears twice")
            if action.kind == "B" and ("F", action.micro_batch) not in seen:
                raise ScheduleError(f"{where}: backward before its forward on the same stage")
            seen.add((action.kind, action.micro_batch))
        if len(seen) != m * len(kinds):
            missing = sorted({(k, i) for k in kinds for i in range(m)} - seen)
            raise ScheduleError(f"schedule {schedule.name!r}, stage {s}: missing actions "
                                + " ".join(f"{k}{i}" for k, i in missing))


def dry_run(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0,
            comm_cost: float = 0.0) -> DryRun:
    """Replay every stage's actions under the runtime's communication rules (see the module docstring)."""
    _validate(schedule)
    p = schedule.num_stages
    channels: dict[tuple[int, int], deque[tuple[str, int, float]]] = {}
    pos = [0] * p
    clock = [0.0] * p
    in_flight = [0] * p
    peaks = [0] * p
    timeline: list[list[Interval]] = [[] for _ in range(p)]

    def recv_from(s: int, action: Action) -> int | None:
        if action.kind == "F":
            return s - 1 if s > 0 else None
        return s + 1 if s < p - 1 else None

    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(schedule.actions[s]):
                action = schedule.actions[s][pos[s]]
                start = clock[s]
                src = recv_from(s, action)
                if src is not None:
                    queue = channels.get((src, s))
                    if not queue:
                        break  # blocked on a receive; another stage may unblock it
                    kind, micro_batch, ready = queue[0]
                    if (kind, micro_batch) != (action.kind, action.micro_batch):
                        raise ScheduleError(
                            f"schedule {schedule.name!r}: mismatched send/recv order on stage {s}: action {action} "
                            f"expects {'activation' if action.kind == 'F' else 'gradient'} of micro-batch "
                            f"{action.micro_batch} from stage {src}, but stage {src} sent micro-batch {micro_batch} "
                            "first")
                    queue.popleft()
                    start = max(start, ready)
                end = start + (forward_cost if action.kind == "F" else backward_cost)
                dst = s + 1 if action.kind == "F" else s - 1
                if 0 <= dst < p:
                    channels.setdefault((s, dst), deque()).append((action.kind, action.micro_batch, end + comm_cost))
                in_flight[s] += 1 if action.kind == "F" else -1
                peaks[s] = max(peaks[s], in_flight[s])
                timeline[s].append(Interval(action, start, end))
                clock[s] = end
                pos[s] += 1
                progressed = True
    blocked = [s for s in range(p) if pos[s] < len(schedule.actions[s])]
    if blocked:
        waits = []
        for s in blocked:
            action = schedule.actions[s][pos[s]]
            what = "activation" if action.kind == "F" else "gradient"
            waits.append(f"stage {s} at {action} waits for the {what} of micro-batch {action.micro_batch} "
                         f"from stage {recv_from(s, action)}")
        raise DeadlockError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(waits))
    makespan = max(clock) if p else 0.0
    busy = sum(iv.end - iv.start for row in timeline for iv in row)
    bubble = 1.0 - busy / (p * makespan) if makespan > 0 else 0.0
    if schedule.forward_only:
        peaks = [0] * p  # forward-only keeps no activation for a backward
    return DryRun(schedule, tuple(tuple(r) for r in timeline), makespan, bubble, tuple(peaks))
