"""Consistency models and the per-key, per-worker clock table the servers keep.

Clock c of a worker is its c-th push of a key (0-based); a worker pulls "at clock c" after pushing clock c. The
table holds, for each key, the last clock each worker pushed (-1 before its first push). A pull at clock c is
answered once the slowest *live* worker reached `c - staleness`:

- BSP (staleness 0): every worker pushed clock c: the parameters include everyone's clock-c update;
- SSP(s): the slowest live worker reached c - s: a worker never reads parameters missing more than s of anyone's
  clocks (Ho et al. 2013);
- ASP: never waits.

The staleness a pull actually saw is `c - slowest`, clamped at 0. A worker is dropped from the minimum when it
said goodbye, or when it was silent for `worker_timeout_s` (a crashed worker must not hang the others).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Consistency:
    """`sync.consistency`, built once from its text when the config is read (`from_setting`); `str()` gives the
    text back, as config.toml stores it."""
    name: str           # "bsp", "ssp" or "asp"
    staleness: float    # 0 for BSP, s for SSP(s), inf for ASP

    @classmethod
    def from_setting(cls, text: str) -> Consistency:
        """The model a setting names: "bsp", "ssp:S" (e.g. "ssp:3") or "asp", in any case."""
        text = text.strip().lower()
        if text == "bsp":
            return cls("bsp", 0)
        if text == "asp":
            return cls("asp", math.inf)
        if text.startswith("ssp:"):
            try:
                bound = int(text[4:])
            except ValueError:
                bound = -1
            if bound < 0:
                raise ValueError("SSP needs a staleness bound >= 0, e.g. 'ssp:3'")
            return cls("ssp", bound)
        raise ValueError("not a consistency model; choose 'bsp', 'ssp:S' (e.g. 'ssp:3') or 'asp'")

    @property
    def aggregates(self) -> bool:
        """BSP sums a clock's pushes from every worker and applies them as one step (the mean gradient, as
        synchronous SGD on the union of the batches); SSP and ASP apply each push when it arrives."""
        return self.name == "bsp"

    def __str__(self) -> str:
        return self.name if self.name != "ssp" else f"ssp:{int(self.staleness)}"


BSP, ASP = Consistency("bsp", 0), Consistency("asp", math.inf)


NO_LIVE_WORKER = 2**62  # what `slowest` reports when no worker is live; real clocks stay below it (server.py)


class ClockTable:
    def __init__(self, num_workers: int, worker_timeout_s: float, now: float, join_grace_s: float = 60.0):
        self.num_workers = num_workers
        self.worker_timeout_s = worker_timeout_s
        self.clocks: dict[Hashable, list[int]] = {}     # key (the server's pieces) -> last clock, per worker
        # A worker not yet heard from gets a longer grace: starting Python and torch on a busy machine takes a while.
        self.last_seen = [now + max(join_grace_s - worker_timeout_s, 0.0)] * num_workers
        self.live = set(range(num_workers))
        self.finished: set[int] = set()

    def add_key(self, key: Hashable, clocks: list[int] | None = None) -> None:
        self.clocks[key] = list(clocks) if clocks is not None else [-1] * self.num_workers

    def seen(self, worker: int, now: float) -> bool:
        """Record a message from `worker`; True if it was dropped before and is back."""
        self.last_seen[worker] = now
        if worker not in self.live and worker not in self.finished:
            self.live.add(worker)
            return True
        return False

    def catch_up(self, worker: int) -> int | None:
        """A dropped worker is back (restarted, or it was only stalled): move its clock on every key up to the
        slowest of the other live workers, so it does not hold back (BSP, SSP) clocks they completed without it.
        Its pushes for the skipped clocks then count as duplicates. Returns its lowest clock after, or None when
        no other worker is live."""
        lowest = None
        for row in self.clocks.values():
            others = [row[w] for w in self.live if w != worker]
            if others:
                row[worker] = max(row[worker], min(others))
                lowest = row[worker] if lowest is None else min(lowest, row[worker])
        return lowest

    def advance(self, key: Hashable, worker: int, clock: int) -> None:
        row = self.clocks[key]
        row[worker] = max(row[worker], clock)

    def finish(self, worker: int) -> None:
        self.finished.add(worker)
        self.live.discard(worker)

    def start_again(self, worker: int, now: float) -> bool:
        """A worker that had said goodbye registers again (a resumed job): it is live once more. True if it had."""
        if worker not in self.finished:
            return False
        self.finished.discard(worker)
        self.live.add(worker)
        self.last_seen[worker] = now
        return True

    def drop_silent(self, now: float, busy: set[int]) -> list[int]:
        """Drop live workers silent for longer than the timeout (a worker blocked in a pull here is `busy`)."""
        dropped = [w for w in sorted(self.live)
                   if w not in busy and now - self.last_seen[w] > self.worker_timeout_s]
        self.live.difference_update(dropped)
        return dropped

    def slowest(self, key: Hashable) -> int:
        """The lowest clock among live workers on `key` (a large number when no worker is live)."""
        row = self.clocks[key]
        return min((row[w] for w in self.live), default=NO_LIVE_WORKER)

    def ready(self, key: Hashable, clock: int, consistency: Consistency) -> bool:
        return consistency.staleness == math.inf or self.slowest(key) >= clock - consistency.staleness

    def staleness_seen(self, key: Hashable, clock: int) -> int:
        return max(0, clock - self.slowest(key))
