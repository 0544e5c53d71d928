"""A server's shard checkpoint: its pieces, optimizer state, clocks and pending BSP sums, written atomically as one
.npz.

Written atomically (temp file, fsync, rename, fsync the directory) by plait.runtime.checkpoint: a server killed
while writing leaves the previous checkpoint intact. Read back with allow_pickle=False: a checkpoint is data, never
code. Nothing here imports torch, so a server starts, and restarts, in a fraction of a second.

The pending BSP sums are pushes a worker was told are in (its ACK) for a clock not yet complete: a restored server
needs them, or those pushes would count as done with their gradients gone. The same format, held in memory, is the
snapshot a primary sends to a (re)joining backup replica (`snapshot_bytes`, replication.py): a checkpoint and a
catch-up are one serializer. `journal_seq` is the last journal record (journal.py) a checkpoint holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plait.runtime.checkpoint import atomic_write_bytes


@dataclass(slots=True)
class ShardState:
    offset: int
    param: np.ndarray
    opt_state: dict[str, np.ndarray]
    clocks: list[int]


@dataclass(slots=True)
class ServerSnapshot:
    shards: dict[tuple[int, int], ShardState] = field(default_factory=dict)   # (key, offset) -> piece
    finished: list[int] = field(default_factory=list)
    updates: int = 0
    # BSP: (key, offset) -> clock -> [sum of its gradients, count]
    sums: dict[tuple[int, int], dict[int, list]] = field(default_factory=dict)
    journal_seq: int = 0


def _arrays(snapshot: ServerSnapshot) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "finished": np.asarray(snapshot.finished, dtype=np.int64),
        "updates": np.asarray([snapshot.updates], dtype=np.int64),
        "journal_seq": np.asarray([snapshot.journal_seq], dtype=np.int64),
    }
    for (key, offset), shard in snapshot.shards.items():
        prefix = f"k{key}_{offset}."
        arrays[prefix + "param"] = shard.param
        arrays[prefix + "clocks"] = np.asarray(shard.clocks, dtype=np.int64)
        for name, value in shard.opt_state.items():
            if name != "scratch":  # working memory, not state
                arrays[f"{prefix}opt.{name}"] = value
    for (key, offset), pending in snapshot.sums.items():
        for clock, (total, count) in pending.items():
            arrays[f"k{key}_{offset}.sum{clock}"] = total
            arrays[f"k{key}_{offset}.count{clock}"] = np.asarray([count], dtype=np.int64)
    return arrays


def save_shards(path: Path, snapshot: ServerSnapshot) -> None:
    arrays = _arrays(snapshot)
    atomic_write_bytes(Path(path), lambda f: np.savez(f, **arrays))


def snapshot_bytes(snapshot: ServerSnapshot) -> bytes:
    """The snapshot as one .npz in memory (what a backup replica catches up from)."""
    buffer = io.BytesIO()
    np.savez(buffer, **_arrays(snapshot))
    return buffer.getvalue()


def checkpointed_clock(path: Path) -> int:
    """The furthest clock any worker had pushed on any piece of a checkpoint file (-1: none), read without loading
    the parameters."""
    with np.load(Path(path), allow_pickle=False) as npz:
        clocks = [npz[name] for name in npz.files if name.endswith(".clocks")]
    return max((int(row.max()) for row in clocks if row.size), default=-1)


def load_shards(source: Path | bytes | memoryview) -> ServerSnapshot:
    """Read a checkpoint file, or the bytes of `snapshot_bytes`."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else Path(source)
    with np.load(handle, allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}
    snapshot = ServerSnapshot(finished=[int(w) for w in data.pop("finished")], updates=int(data.pop("updates")[0]),
                              journal_seq=int(data.pop("journal_seq", np.zeros(1, np.int64))[0]))
    for name in [n for n in data if ".sum" in n]:
        prefix, clock = name.split(".sum")
        key, offset = (int(part) for part in prefix[1:].split("_"))
        count = int(data.pop(f"{prefix}.count{clock}")[0])
        snapshot.sums.setdefault((key, offset), {})[int(clock)] = [data.pop(name).copy(), count]
    prefixes = sorted({name.split(".")[0] + "." for name in data})
    for prefix in prefixes:
        if "_" in prefix:
            key, offset = (int(part) for part in prefix[1:-1].split("_"))
        else:  # written before keys had several pieces per server: one piece, its offset stored beside it
            key, offset = int(prefix[1:-1]), int(data.pop(prefix + "offset")[0])
        opt = {name[len(prefix) + 4:]: value for name, value in data.items() if name.startswith(prefix + "opt.")}
        param = data[prefix + "param"].copy()  # writable
        opt = {name: value.copy() for name, value in opt.items()}
        opt["scratch"] = np.empty_like(param)
        snapshot.shards[key, offset] = ShardState(offset, param, opt, [int(c) for c in data[prefix + "clocks"]])
    return snapshot
