"""What a server refuses, counted by reason and logged as a count and a sample per interval: a flood of bad input
must not become a flood of log lines (nor fill the disk), and one refusal alone is still seen at once.

Reasons: `malformed` (not a request at all), `unservable` (a request that contradicts itself or the stored pieces),
`nonfinite` (a value holding NaN or Inf), `unauthorised` (an op the sender's key may not send, or a worker id it is
not bound to: trust.py),
`replication` (a change the backup's state cannot take), `handshake` (a CurveZMQ handshake the server refused).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any


class CountedLog:
    """Counts per reason; writes `event` with the counts since its last line and the first sample of each reason,
    at most once per `every_s` (the first one at once). `flush` writes what is left (at the server's stop)."""

    def __init__(self, write: Callable[..., None], event: str, every_s: float):
        self.write, self.event, self.every_s = write, event, every_s
        self.totals: Counter[str] = Counter()
        self.window: Counter[str] = Counter()
        self.samples: dict[str, dict[str, Any]] = {}
        self.written_at = -math.inf

    def count(self, reason: str, now: float, times: int = 1, **sample: Any) -> None:
        self.totals[reason] += times
        self.window[reason] += times
        if sample:
            self.samples.setdefault(reason, sample)
        self.tick(now)

    def tick(self, now: float) -> None:
        if self.window and now - self.written_at >= self.every_s:
            self.flush()
            self.written_at = now

    def flush(self) -> None:
        if not self.window:
            return
        self.write(self.event, count=sum(self.window.values()), reasons=dict(self.window), samples=self.samples,
                   total=sum(self.totals.values()))
        self.window, self.samples = Counter(), {}
