"""A server's shard checkpoint: its pieces, optimizer state and clocks, written atomically as one .npz.

Written atomically (temp file, fsync, rename, fsync the directory) by plait.experiment.checkpoint: a server killed
while writing leaves the previous checkpoint intact. Read back with allow_pickle=False: a checkpoint is data, never
code. Nothing here imports torch, so a server starts, and restarts, in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plait.experiment.checkpoint import atomic_write_bytes


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


def save_shards(path: Path, snapshot: ServerSnapshot) -> None:
    arrays: dict[str, np.ndarray] = {
        "finished": np.asarray(snapshot.finished, dtype=np.int64),
        "updates": np.asarray([snapshot.updates], dtype=np.int64),
    }
    for (key, offset), shard in snapshot.shards.items():
        prefix = f"k{key}_{offset}."
        arrays[prefix + "param"] = shard.param
        arrays[prefix + "clocks"] = np.asarray(shard.clocks, dtype=np.int64)
        for name, value in shard.opt_state.items():
            if name != "scratch":  # working memory, not state
                arrays[f"{prefix}opt.{name}"] = value
    atomic_write_bytes(Path(path), lambda f: np.savez(f, **arrays))


def load_shards(path: Path) -> ServerSnapshot:
    with np.load(Path(path), allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}
    snapshot = ServerSnapshot(finished=[int(w) for w in data.pop("finished")], updates=int(data.pop("updates")[0]))
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
