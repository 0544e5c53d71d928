"""Which server holds which element range of each key: balanced by size.

The keys of one `init` call are laid end to end (in the order given) and the line is cut into `num_servers`
contiguous ranges of equal size (±1 element), as ps-lite cuts its key space into one range per server. A big key is
therefore split across servers (a worker splits its push and gathers its pull), small keys stay whole, and every
server holds the same number of elements whatever the layer sizes are. Every worker computes the same plan from
the same keys, so no coordinator is needed.

A server's range of one key is further cut into pieces of at most `max_piece` elements, each with its own clock on
the server: a big push then streams as several messages, and the server applies piece i while piece i+1 is still on
the wire (the update overlaps the transfer instead of following it; benchmarks/ps_throughput.py). The pieces of a
key are updated independently, as pieces on different servers always were: under ASP a pull may mix versions
across pieces; under BSP/SSP every piece honours the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2 MiB of float32 per message: big enough that per-message costs vanish, small enough that a server applies one
# piece while the next is on the wire. Measured (benchmarks/ps_throughput.py --piece-numel): no clear difference
# from whole pieces at 1e6-4e6 floats, 2x faster at 1e7 floats, where one 40 MB ZeroMQ message is slow.
DEFAULT_PIECE_NUMEL = 1 << 19


@dataclass(frozen=True, slots=True)
class Piece:
    server: int
    offset: int   # first element of the key held by this server
    numel: int


def plan_shards(sizes: dict[int, int], num_servers: int, max_piece: int = 0) -> dict[int, list[Piece]]:
    """key -> its pieces in order; `max_piece` 0 keeps each server's range of a key whole."""
    if num_servers < 1:
        raise ValueError(f"sync.servers must be >= 1, got {num_servers}")
    if max_piece < 0:
        raise ValueError(f"sync.piece_numel must be >= 0 (0: no limit), got {max_piece}")
    for key, size in sizes.items():
        if size < 1:
            raise ValueError(f"ps init: key {key} is empty")
    total = sum(sizes.values())
    # Server j owns global elements [bounds[j], bounds[j+1]).
    bounds = [total * j // num_servers for j in range(num_servers + 1)]
    plan: dict[int, list[Piece]] = {}
    start = 0
    for key, size in sizes.items():
        pieces = []
        for server in range(num_servers):
            lo, hi = max(start, bounds[server]), min(start + size, bounds[server + 1])
            if lo < hi:
                step = max_piece or hi - lo
                pieces += [Piece(server, at - start, min(step, hi - at)) for at in range(lo, hi, step)]
        plan[key] = pieces
        start += size
    return plan


def server_loads(plan: dict[int, list[Piece]], num_servers: int) -> list[int]:
    loads = [0] * num_servers
    for pieces in plan.values():
        for piece in pieces:
            loads[piece.server] += piece.numel
    return loads
