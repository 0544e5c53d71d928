"""An unreplicated server's journal: every change of its state since its last checkpoint, written before the change
is acknowledged, so that a server killed (SIGKILL) at any moment, before its first checkpoint included, restarts
from its checkpoint plus its journal holding every piece it created and every push it acknowledged. With
`sync.replication = 2` the backup replica holds them instead, and there is no journal.

A record is one change of the replication stream (replication.py: a REPLICATE header with the `Change` in `extra`
and the record's sequence number in `req`): a prefix (the header, the payload's length, a CRC-32 of both) and the
payload. The server replays it with the code a backup replays the stream with. A write that returned is in the
kernel's page cache, so it outlives the process (not the machine: the checkpoint's fsync covers that).

The file's pages are reused. After a checkpoint (which holds every record so far and says which: its last sequence
number) the journal writes again from the start of the file, over the records the checkpoint holds, instead of
truncating it: appending to a truncated file took the kernel a fresh page for every 4 KiB written, 0.51 ms for a 2
MiB push against 0.20 ms over pages it already had, most of a server's time per push (benchmarks/RESULTS.md). So
what follows the last record written is old records, not the file's end, and a record is written so that a kill at
any moment leaves nothing that reads as a record it is not:
- its payload first, then its prefix: a kill during the payload leaves the old bytes where the prefix goes;
- the prefix's CRC: a prefix cut short (a kill between two pages of it) fails its check;
- sequence numbers: the records read back are those that follow one another (each one more than the one before);
  an old record after the last new one has a lower number, and the checkpoint's number skips the old ones read
  from the start (a kill after a checkpoint, before any new record).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from plait.ps.wire import HEADER_BYTES, Header

_LENGTH_CRC = struct.Struct("<QI4x")   # payload bytes, CRC-32 of the header and the length, 4 bytes of padding
PREFIX_BYTES = HEADER_BYTES + _LENGTH_CRC.size
# A journal holding this many times the shard's bytes, and at least COMPACT_FLOOR, is folded into a checkpoint. A
# checkpoint of a 4 MB shard took 7 ms (written, fsynced, renamed): with a floor of 16 MiB, one every 32 pushed
# pieces of 2 MiB was a tenth of the server's time (benchmarks/RESULTS.md). Replaying 256 MiB after a kill takes
# a fraction of a second, and the file's pages are reused, so it holds that much of the page cache at most.
COMPACT_AFTER_SHARDS = 16
COMPACT_FLOOR = 256 << 20


def _crc(header: bytes, length: int) -> int:
    """What a record's prefix checks: its header and its payload's length."""
    return zlib.crc32(header + struct.pack("<Q", length))


def _prefix(header: bytes, length: int) -> bytes:
    return header + _LENGTH_CRC.pack(length, _crc(header, length))


class Journal:
    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        if fresh:
            self.path.unlink(missing_ok=True)
        self.seq = 0            # the last record's sequence number (ever, across checkpoints)
        self._fd: int | None = None
        self._end: int | None = None  # where the next record goes (None: after the records on disk, found first)

    def records(self) -> Iterator[tuple[Header, bytes]]:
        """The records on disk, in order, up to the first that is cut short, unreadable, or not the next in
        sequence (an older record the file's pages still hold)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        at, last = 0, None
        while at + PREFIX_BYTES <= len(data):
            length, crc = _LENGTH_CRC.unpack_from(data, at + HEADER_BYTES)
            if _crc(data[at: at + HEADER_BYTES], length) != crc:
                break
            try:
                header = Header.unpack(data[at: at + HEADER_BYTES])
            except ValueError:
                break
            start = at + PREFIX_BYTES
            if start + length > len(data) or (last is not None and header.req != last + 1):
                break  # cut short by a kill during its write (never acknowledged), or an older record
            last = header.req
            self.seq = max(self.seq, header.req)
            yield header, data[start: start + length]
            at = start + length
        self._end = at

    def append(self, header: Header, payload: np.ndarray | None) -> None:
        """One change, written before the reply that acknowledges it is sent (`header.req` is set here)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if self._end is None:
            for _ in self.records():  # a journal reopened without a replay: write after its records
                pass
        assert self._end is not None
        self.seq += 1
        header.req = self.seq
        body = memoryview(np.ascontiguousarray(payload)).cast("B") if payload is not None else memoryview(b"")
        _write_all(self._fd, body, self._end + PREFIX_BYTES)  # the payload, then the prefix that makes it a record
        _write_all(self._fd, memoryview(_prefix(header.pack(), len(body))), self._end)
        self._end += PREFIX_BYTES + len(body)

    @property
    def bytes(self) -> int:
        """The records' bytes since the last checkpoint (where the next record goes)."""
        return self._end or 0

    def checkpointed(self, seq: int) -> None:
        """A checkpoint on disk holds every record up to `seq` (all of them on disk): the next record is number
        `seq + 1` or later, written at the file's start, over the old ones (the module's docstring). Numbering on
        from the checkpoint's `seq`, not from the records found, matters after a restart: a journal emptied by a
        checkpoint (or whose first record a kill cut short) holds none of the numbers the checkpoint does, and a
        record numbered below them would be taken for one it holds, and skipped, at the next replay."""
        self.seq = max(self.seq, seq)
        self._end = 0

    def release(self) -> None:
        """After the last checkpoint of a server that stops (it holds every record): truncate the file, giving its
        pages and disk back. Between checkpoints its size is kept, for speed (the module's docstring)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, 0)
        self._end = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # a short write (rare, e.g. a signal): write the rest
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
