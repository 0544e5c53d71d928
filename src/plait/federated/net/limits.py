"""The FL server's limits on what one peer can hold or cost it: update streams open at once (each holds a
model-sized buffer), the chunks a stream may take, and how many log lines a flood of refusals may write."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from plait.federated.net.wire import WireError, chunk_data

LOGGED_PER_REASON = 10  # refusals logged one by one per reason; after that a count every LOG_EVERY_S
LOG_EVERY_S = 10.0


class StreamSlots:
    """Update streams open at once, per client and in all (net.max_streams_per_client, net.max_streams)."""

    def __init__(self, per_client: int, total: int):
        self.per_client, self.total = per_client, total
        self.open: Counter[int] = Counter()

    def refusal(self, cid: int, rpc: str) -> WireError | None:
        """Why `cid` may not open another stream now, or None (and the slot is taken: `release` gives it back)."""
        if self.open[cid] >= self.per_client or sum(self.open.values()) >= self.total:
            return WireError("busy", f"{rpc}: too many update streams open (client {cid}: {self.open[cid]}, "
                                     f"all: {sum(self.open.values())})")
        self.open[cid] += 1
        return None

    def release(self, cid: int) -> None:
        self.open[cid] -= 1
        if not self.open[cid]:
            del self.open[cid]


async def bounded_data(stream: AsyncIterator[Any], max_bytes: int, what: str) -> AsyncIterator[Any]:
    """The data chunks of a stream: an empty chunk, or more chunks than `max_bytes` needs (at 1 KiB each, plus
    slack), is refused, so a peer cannot keep a buffer open with a trickle of nothing."""
    limit, count = 64 + max_bytes // 1024, 0
    async for chunk in stream:
        data = chunk_data(chunk, what)
        count += 1
        if not len(data) or count > limit:
            raise WireError("malformed", f"{what}: {'an empty chunk' if not len(data) else f'over {limit} chunks'}"
                                         f" for {max_bytes} bytes")
        yield data


class RefusalLog:
    """The first refusals of each reason logged one by one, then a count per reason every LOG_EVERY_S: a flood of
    bad requests must not become a flood of log lines."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.logged_at: dict[str, float] = {}

    def write(self, who: str, err: WireError, count: int) -> None:
        if count <= LOGGED_PER_REASON:
            self.log.warning("refused %s: %s (%s)%s", who, err, err.reason,
                             "; further refusals of this kind are counted" if count == LOGGED_PER_REASON else "")
            return
        now = time.monotonic()
        if now - self.logged_at.get(err.reason, 0.0) >= LOG_EVERY_S:
            self.logged_at[err.reason] = now
            self.log.warning("refused %d requests so far for %s; latest: %s: %s", count, err.reason, who, err)
