"""Pipeline schedules as data: per-stage lists of actions (stage, F/B/W, micro-batch), printable, and a dry run.

A schedule has one row per pipeline rank position (`num_stages` = p rows). With `chunks_per_rank` = v > 1 (interleaved
schedules) the model is cut into p·v *virtual stages* and row r holds virtual stages r, r+p, r+2p, ...; an action's
`stage` is always the virtual stage (the same as the row when v = 1). The kinds:
- F: forward of one micro-batch through one virtual stage;
- B: backward: the gradient w.r.t. the stage's input and, unless the row also holds a W for the same stage and
  micro-batch, the weight gradients too;
- W: the deferred weight gradients of a B (zero-bubble schedules split the backward so that the B on the critical
  path is shorter and the W fills what would be idle time).

The runtime (stage.py) executes exactly these lists. Its communication rules, which the dry run mirrors:
- a forward on virtual stage s > 0 first receives micro-batch k's activation from s-1; a forward on s < P-1 (P = p·v)
  then sends its output to s+1 (virtual stage s lives on row s mod p, so the last row's chunk c sends into the first
  row's chunk c+1);
- a backward on virtual stage s < P-1 first receives micro-batch k's output gradient from s+1; a backward on s > 0
  then sends its input gradient to s-1; W neither sends nor receives;
- sends are non-blocking (isend), receives block, and messages on each (sender, receiver) channel are matched in
  order (as NCCL does; no tags), so a receiver must expect messages in the order the sender sent them (with p = 2 and
  v > 1 one channel carries both activations and gradients: their interleaving must agree too).
`dry_run` replays all rows against these rules with abstract costs, before any process runs. It raises
`ScheduleError` for a malformed schedule or a mismatched send/recv order, `DeadlockError` when every unfinished row
waits on a message that can never come; otherwise it returns the simulated timeline, bubble and in-flight peaks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B", "W"]


class ScheduleError(ValueError):
    """A schedule that cannot run correctly; the message names the stage and the action."""


class DeadlockError(ScheduleError):
    """Every unfinished stage waits on a receive that no stage will ever send."""


@dataclass(frozen=True, slots=True)
class Action:
    stage: int        # the virtual stage: the row's own stage unless the schedule is interleaved
    kind: Kind
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    num_stages: int                          # p: rows, one per rank of a pipeline
    num_micro_batches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[s]: what row s does, in order
    forward_only: bool = False
    chunks_per_rank: int = 1                 # v: virtual stages per row (interleaved schedules)

    @property
    def num_virtual_stages(self) -> int:
        return self.num_stages * self.chunks_per_rank

    def label(self, action: Action) -> str:
        """'F3' for micro-batch 3; '5F3' (virtual stage 5) when a row holds several virtual stages."""
        return f"{action.stage}{action}" if self.chunks_per_rank > 1 else str(action)

    def __str__(self) -> str:
        head = f"{self.name}: {self.num_stages} stages, {self.num_micro_batches} micro-batches"
        if self.chunks_per_rank > 1:
            head = (f"{self.name}: {self.num_stages} stages × {self.chunks_per_rank} chunks = "
                    f"{self.num_virtual_stages} virtual stages, {self.num_micro_batches} micro-batches "
                    "(action = virtual stage, F/B, micro-batch)")
        rows = []
        for s, acts in enumerate(self.actions):
            held = "" if self.chunks_per_rank == 1 else \
                " (virtual " + ", ".join(str(s + c * self.num_stages) for c in range(self.chunks_per_rank)) + ")"
            rows.append(f"  stage {s}{held}: " + " ".join(self.label(a) for a in acts))
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


def _interleaved_order(row: int, num_stages: int, num_micro_batches: int, chunks: int, kind: Kind,
                       reverse_chunks: bool) -> list[Action]:
    """Row `row`'s actions of one kind in interleaved order: micro-batches in groups of p, each group through the
    row's chunks in turn (forwards: chunk 0 first; backwards: the last chunk first)."""
    p, order = num_stages, []
    for group in range(0, num_micro_batches, p):
        for c in range(chunks):
            chunk = chunks - 1 - c if reverse_chunks else c
            order += [Action(chunk * p + row, kind, k) for k in range(group, min(group + p, num_micro_batches))]
    return order


def interleaved_one_f_one_b(num_stages: int, num_micro_batches: int, chunks_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): every rank holds v model chunks (virtual stages r,
    r+p, ...), so a micro-batch crosses the ranks v times in shorter hops and the fill and drain shrink v-fold:
    bubble (p-1)/(v·m+p-1). Micro-batches go in groups of p (m must be a multiple of p); stage s warms up with
    2(p-1-s) + (v-1)p forwards, then alternates one forward and one backward, then drains. With v = 1 this is 1F1B.
    The price: v times as many messages, and each stage holds up to about v·p + 2(p-1-s) chunk activations."""
    _check_sizes(num_stages, num_micro_batches)
    p, m, v = num_stages, num_micro_batches, chunks_per_rank
    if v < 1:
        raise ValueError(f"parallel.chunks_per_rank must be >= 1, got {v}")
    if v == 1:
        return one_f_one_b(p, m)
    if p < 2:
        raise ValueError("parallel.schedule = 'interleaved_1f1b' needs parallel.stages >= 2 (with one stage its "
                         "chunks would send to themselves); use parallel.chunks_per_rank = 1")
    if m % p:
        raise ValueError(f"parallel.schedule = 'interleaved_1f1b' runs micro-batches in groups of parallel.stages: "
                         f"parallel.micro_batches = {m} must be a multiple of parallel.stages = {p}")
    rows = []
    for s in range(p):
        forwards = _interleaved_order(s, p, m, v, "F", reverse_chunks=False)
        backwards = _interleaved_order(s, p, m, v, "B", reverse_chunks=True)
        warmup = min(2 * (p - 1 - s) + (v - 1) * p, m * v)
        row = forwards[:warmup]
        for i in range(m * v - warmup):
            row += [forwards[warmup + i], backwards[i]]
        rows.append(tuple(row + backwards[m * v - warmup:]))
    return Schedule("interleaved_1f1b", p, m, tuple(rows), chunks_per_rank=v)


def zero_bubble(num_stages: int, num_micro_batches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with every backward split into B (input
    gradient, which the previous stage waits for) and W (weight gradients, which nothing waits for). Stage s runs
    1F1B's forwards and B's, and holds back its first s W's, doing each later in the place of a W it owes: the B's
    reach stage 0 sooner and the W's fill the drain. Bubble (p-1)(F+B-W) per stage instead of (p-1)(F+B+W), a third
    of 1F1B's when F = B = W. A micro-batch's activations are held until its W: every stage holds up to p, the
    peak of 1F1B's first stage (1F1B's later stages hold fewer)."""
    _check_sizes(num_stages, num_micro_batches)
    p, m = num_stages, num_micro_batches
    rows = []
    for s in range(p):
        warmup = min(p - 1 - s, m)
        row = [Action(s, "F", k) for k in range(warmup)]
        owed: deque[int] = deque()
        for i in range(m):  # the i-th backward, after the forward it alternates with (none in the drain)
            if warmup + i < m:
                row.append(Action(s, "F", warmup + i))
            row.append(Action(s, "B", i))
            owed.append(i)
            if i >= s:
                row.append(Action(s, "W", owed.popleft()))
        row += [Action(s, "W", k) for k in owed]
        rows.append(tuple(row))
    return Schedule("zero_bubble", p, m, tuple(rows))


def forward_only(num_stages: int, num_micro_batches: int, chunks_per_rank: int = 1) -> Schedule:
    """Pipelined inference: every stage forwards micro-batches 0..m-1 as they arrive (with v chunks per rank, in
    groups of p through the chunks in turn, as interleaved training orders them)."""
    _check_sizes(num_stages, num_micro_batches)
    if chunks_per_rank < 1 or (chunks_per_rank > 1 and num_stages < 2):
        raise ValueError(f"parallel.chunks_per_rank = {chunks_per_rank} does not fit {num_stages} stage(s)")
    acts = tuple(tuple(_interleaved_order(s, num_stages, num_micro_batches, chunks_per_rank, "F", False))
                 for s in range(num_stages))
    return Schedule("forward", num_stages, num_micro_batches, acts, forward_only=True,
                    chunks_per_rank=chunks_per_rank)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_one_f_one_b,
             "zero_bubble": zero_bubble}


def build_schedule(name: str, num_stages: int, num_micro_batches: int, chunks_per_rank: int = 1) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule = {name!r} is not known; choose one of {sorted(SCHEDULES)}")
    if name == "interleaved_1f1b":
        return interleaved_one_f_one_b(num_stages, num_micro_batches, chunks_per_rank)
    if chunks_per_rank != 1:
        raise ValueError(f"parallel.chunks_per_rank = {chunks_per_rank} needs parallel.schedule = "
                         f"'interleaved_1f1b', not {name!r}")
    return SCHEDULES[name](num_stages, num_micro_batches)


def bubble_theory(num_stages: int, num_micro_batches: int, *, schedule: str = "1f1b", chunks_per_rank: int = 1,
                  forward_cost: float = 1.0, backward_cost: float = 2.0, weight_cost: float | None = None) -> float:
    """The idle share of a synchronous pipeline with equal stages and free communication:
    GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B (p-1)/(v·m+p-1); zero bubble (ZB-H1) (p-1)(F+B-W) idle per
    stage against m(F+B+W) busy, with B = backward_cost - W and W = weight_cost (default half the backward), which is
    (p-1)/(3m+p-1) when F = B = W. The costs matter only for zero bubble; its figure is exact for m >= p and
    W <= min(F, B) (ZB-H1's assumption: a W fits wherever the schedule puts it without delaying a B)."""
    p, m = num_stages, num_micro_batches
    if schedule == "interleaved_1f1b":
        return (p - 1) / (chunks_per_rank * m + p - 1)
    if schedule == "zero_bubble":
        w = backward_cost / 2 if weight_cost is None else weight_cost
        b = backward_cost - w
        idle = (p - 1) * (forward_cost + b - w)
        return idle / (m * (forward_cost + b + w) + idle)
    return (p - 1) / (m + p - 1)


@dataclass(frozen=True, slots=True)
class Interval:
    action: Action
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class DryRun:
    schedule: Schedule
    timeline: tuple[tuple[Interval, ...], ...]  # per row (rank), in execution order
    makespan: float
    bubble: float                                 # 1 - busy / (stages × makespan)
    peak_in_flight: tuple[int, ...]               # per row: most (virtual stage, micro-batch) activations held

    def format_timeline(self, unit: float = 1.0) -> str:
        """One row per stage, one column per `unit` of simulated time: 'F3', 'B0', 'W1' (with the virtual stage in
        front when interleaved: '5F3') or dots (idle)."""
        cols = max(1, round(self.makespan / unit))
        width = max((len(self.schedule.label(iv.action)) for row in self.timeline for iv in row), default=2)
        lines = []
        for s, row in enumerate(self.timeline):
            cells = ["." * width] * cols
            for iv in row:
                for c in range(round(iv.start / unit), round(iv.end / unit)):
                    cells[c] = self.schedule.label(iv.action).ljust(width)
            lines.append(f"stage {s}: " + " ".join(cells))
        return "\n".join(lines)


def _validate(schedule: Schedule) -> None:
    p, m, v = schedule.num_stages, schedule.num_micro_batches, schedule.chunks_per_rank
    if len(schedule.actions) != p:
        raise ScheduleError(f"schedule {schedule.name!r} has {len(schedule.actions)} stage rows, expected {p}")
    if v < 1 or (v > 1 and p < 2):
        raise ScheduleError(f"schedule {schedule.name!r}: {v} chunks per rank on {p} stage(s) cannot run")
    kinds = ("F",) if schedule.forward_only else ("F", "B", "W")
    required: tuple[Kind, ...] = ("F",) if schedule.forward_only else ("F", "B")
    for s, row in enumerate(schedule.actions):
        seen: set[tuple[int, Kind, int]] = set()
        for action in row:
            where = f"schedule {schedule.name!r}, stage {s}, action {schedule.label(action)}"
            if action.stage % p != s or not 0 <= action.stage < p * v:
                raise ScheduleError(f"{where}: belongs to stage {action.stage}")
            if action.kind not in kinds or not 0 <= action.micro_batch < m:
                raise ScheduleError(f"{where}: not a valid action for {m} micro-batches ({'/'.join(kinds)})")
            if (action.stage, action.kind, action.micro_batch) in seen:
                raise ScheduleError(f"{where}: appears twice")
            if action.kind == "B" and (action.stage, "F", action.micro_batch) not in seen:
                raise ScheduleError(f"{where}: backward before its forward on the same stage")
            if action.kind == "W" and (action.stage, "B", action.micro_batch) not in seen:
                raise ScheduleError(f"{where}: weight gradient before its backward on the same stage")
            seen.add((action.stage, action.kind, action.micro_batch))
        wanted = {(s + c * p, k, i) for c in range(v) for k in required for i in range(m)}
        missing = sorted(wanted - seen, key=lambda t: (t[0], t[1], t[2]))
        if missing:
            raise ScheduleError(f"schedule {schedule.name!r}, stage {s}: missing actions "
                                + " ".join(schedule.label(Action(st, k, i)) for st, k, i in missing))


def split_backwards(row: tuple[Action, ...]) -> set[tuple[int, int]]:
    """(virtual stage, micro-batch) of the row's backwards whose weight gradients a later W computes."""
    return {(a.stage, a.micro_batch) for a in row if a.kind == "W"}


def dry_run(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0,
            comm_cost: float = 0.0, weight_cost: float | None = None) -> DryRun:
    """Replay every row's actions under the runtime's communication rules (see the module docstring).

    A whole backward costs `backward_cost`; one split into B and W costs `backward_cost - weight_cost` and
    `weight_cost` (default: half each, so every schedule does the same work)."""
    _validate(schedule)
    p, last = schedule.num_stages, schedule.num_virtual_stages - 1
    w_cost = backward_cost / 2 if weight_cost is None else weight_cost
    if not 0 <= w_cost <= backward_cost:
        raise ValueError(f"weight_cost = {w_cost} must lie in [0, backward_cost = {backward_cost}]")
    # a message on a channel: (kind, the virtual stage it is for, micro-batch, time it is ready)
    channels: dict[tuple[int, int], deque[tuple[str, int, int, float]]] = {}
    pos = [0] * p
    clock = [0.0] * p
    in_flight = [0] * p
    peaks = [0] * p
    timeline: list[list[Interval]] = [[] for _ in range(p)]
    split = [split_backwards(row) for row in schedule.actions]

    def source(action: Action) -> int | None:
        """The virtual stage whose message the action waits for, if any."""
        if action.kind == "F":
            return action.stage - 1 if action.stage > 0 else None
        if action.kind == "B":
            return action.stage + 1 if action.stage < last else None
        return None

    def cost(s: int, action: Action) -> float:
        if action.kind == "F":
            return forward_cost
        if action.kind == "W":
            return w_cost
        return backward_cost - w_cost if (action.stage, action.micro_batch) in split[s] else backward_cost

    def where(s: int, action: Action, src: int) -> tuple[str, str]:
        if schedule.chunks_per_rank == 1:
            return f"stage {s} at {action}", f"stage {src}"
        return f"stage {s} at {schedule.label(action)}", f"virtual stage {src} (stage {src % p})"

    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(schedule.actions[s]):
                action = schedule.actions[s][pos[s]]
                start = clock[s]
                src = source(action)
                if src is not None:
                    queue = channels.get((src % p, s))
                    if not queue:
                        break  # blocked on a receive; another stage may unblock it
                    kind, stage, micro_batch, ready = queue[0]
                    if (kind, stage, micro_batch) != (action.kind, action.stage, action.micro_batch):
                        me, them = where(s, action, src)
                        sent = f"micro-batch {micro_batch}" if schedule.chunks_per_rank == 1 else \
                            f"the {'activation' if kind == 'F' else 'gradient'} of micro-batch {micro_batch} " \
                            f"for virtual stage {stage}"
                        raise ScheduleError(
                            f"schedule {schedule.name!r}: mismatched send/recv order on stage {s}: action "
                            f"{schedule.label(action)} expects {'activation' if action.kind == 'F' else 'gradient'} "
                            f"of micro-batch {action.micro_batch} from {them}, but stage {src % p} sent {sent} "
                            "first")
                    queue.popleft()
                    start = max(start, ready)
                end = start + cost(s, action)
                if action.kind != "W":
                    dst = action.stage + 1 if action.kind == "F" else action.stage - 1
                    if 0 <= dst <= last:
                        channels.setdefault((s, dst % p), deque()).append(
                            (action.kind, dst, action.micro_batch, end + comm_cost))
                # activations are held from the forward until the backward that needs them last (W when split)
                if action.kind == "F":
                    in_flight[s] += 1
                elif action.kind == "W" or (action.stage, action.micro_batch) not in split[s]:
                    in_flight[s] -= 1
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
            src = source(action)
            if src is None:  # a stage only ever blocks on a receive, which has a sender
                raise AssertionError(f"stage {s} blocked at {action}, which receives nothing")
            me, them = where(s, action, src)
            waits.append(f"{me} waits for the {what} of micro-batch {action.micro_batch} from {them}")
        raise DeadlockError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(waits))
    makespan = max(clock) if p else 0.0
    busy = sum(iv.end - iv.start for row in timeline for iv in row)
    bubble = 1.0 - busy / (p * makespan) if makespan > 0 else 0.0
    if schedule.forward_only:
        peaks = [0] * p  # forward-only keeps no activation for a backward
    return DryRun(schedule, tuple(tuple(r) for r in timeline), makespan, bubble, tuple(peaks))
