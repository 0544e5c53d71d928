"""An unreplicated server's journal: every change of its state since its last checkpoint, appended before the change
is acknowledged, so that a server killed (SIGKILL) at any moment, before its first checkpoint included, restarts
from its checkpoint plus its journal holding every piece it created and every push it acknowledged. With
`sync.replication = 2` the backup replica holds them instead, and there is no journal.

A record is one change of the replication stream (replication.py: a REPLICATE header with the `Change` in `extra`
and the record's sequence number in `req`), the payload's length (8 bytes) and the payload; the server replays it
with the code a backup replays the stream with. A write() that returned is in the kernel's page cache, so it outlives
the process (not the machine: the checkpoint's fsync covers that). A record cut short by a kill during its write was
never acknowledged: replay stops there. A checkpoint stores the last sequence number it holds; replay skips the
records up to it (a kill between the checkpoint and the journal's truncation), and the journal then starts afresh.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from plait.ps.wire import HEADER_BYTES, Header

_LENGTH = struct.Struct("<Q")
COMPACT_AFTER_SHARDS = 16  # a journal holding this many times the shard's bytes is folded into a checkpoint


class Journal:
    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        if fresh:
            self.path.unlink(missing_ok=True)
        self.seq = 0            # the last record's sequence number (ever, across truncations)
        self.bytes = 0          # bytes written since the last truncation
        self._fd: int | None = None

    def records(self) -> Iterator[tuple[Header, bytes]]:
        """The records on disk, in order, up to the first incomplete or unreadable one."""
        data = self.path.read_bytes() if self.path.exists() else b""
        at = 0
        while at + HEADER_BYTES + _LENGTH.size <= len(data):
            try:
                header = Header.unpack(data[at: at + HEADER_BYTES])
            except ValueError:
                return
            (length,) = _LENGTH.unpack_from(data, at + HEADER_BYTES)
            start = at + HEADER_BYTES + _LENGTH.size
            if start + length > len(data):
                return  # cut short by a kill during its write: never acknowledged
            self.seq = max(self.seq, header.req)
            yield header, data[start: start + length]
            at = start + length

    def append(self, header: Header, payload: np.ndarray | None) -> None:
        """One change, written before the reply that acknowledges it is sent (`header.req` is set here)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.seq += 1
        header.req = self.seq
        body = memoryview(np.ascontiguousarray(payload)).cast("B") if payload is not None else memoryview(b"")
        parts = [header.pack() + _LENGTH.pack(len(body)), body]
        written = os.writev(self._fd, parts)
        while written < sum(len(p) for p in parts):  # a short write (rare, e.g. a signal): write the rest
            rest = b"".join(bytes(p) for p in parts)[written:]
            written += os.write(self._fd, rest)
        self.bytes += written

    def truncate(self) -> None:
        """After a checkpoint that holds every record so far."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.ftruncate(self._fd, 0)
        self.bytes = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
