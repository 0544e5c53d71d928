"""The parameter server's message: one fixed-size struct header frame, then (optionally) one raw-bytes frame.

Security rule: nothing on this wire is pickled. The header is `struct`-packed fixed fields; a payload is the raw
little-endian bytes of a 1-D array whose dtype and length the header states, read back with `np.frombuffer` (a view
of the received frame: no copy).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

VERSION = 1


class Op(enum.IntEnum):
    INIT = 1       # worker → server: a key's piece and its initial value (first writer wins); from worker -1,
                   # the launcher creating pieces before the workers start (counted in no clock)
    PUSH = 2       # worker → server: a gradient piece for clock `clock`
    PULL = 3       # worker → server: want the piece as of clock `clock` (under the consistency model)
    BYE = 4        # worker → server: this worker finished; leave the clock
    SHUTDOWN = 5   # launcher → server: write a final checkpoint and exit
    PUSHPULL = 6   # worker → server: PUSH then PULL of one piece in one message, answered by the VALUE alone (or
                   # an ACK first when the pull has to wait: the worker then resends only the pull)
    REPLICATE = 7  # primary → backup (sync.replication = 2): one change of the shard, `req` its sequence number,
                   # `extra` its kind (replication.Change); answered by an ACK with the same `req`
    HELLO = 8      # server → its partner replica: "I (re)started; make me your backup" (answered by a SNAPSHOT)
    ACK = 16       # server → worker: INIT / PUSH / BYE done (`extra` = the worker's clock on that key for INIT)
    VALUE = 17     # server → worker: a PULL's answer (`extra` = staleness seen, `clock` = slowest live clock)
    ERROR = 18     # server → worker: a request failed; the payload is a UTF-8 message
    NOT_PRIMARY = 19  # server → worker: this replica does not serve the range now; ask its partner


class MalformedMessage(ValueError):
    """A message that cannot be read as a request (no header frame, a header of the wrong size or version, an
    unknown op or dtype): the server logs it with the sender's identity and drops it; there is nothing to answer."""

    def __init__(self, peer: bytes, reason: str):
        super().__init__(reason)
        self.peer = peer


class Flag(enum.IntFlag):
    NONE = 0
    OBSERVER = 1   # a pull from an evaluator: answered at once, never counted in the clocks


DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f8")}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}

# version, op, dtype, flags, worker, key, clock, request id, offset, numel, extra
_HEADER = struct.Struct("<BBBBiiqQQQq")
HEADER_BYTES = _HEADER.size


@dataclass(slots=True)
class Header:
    op: Op
    worker: int = -1
    key: int = 0
    clock: int = -1
    req: int = 0
    offset: int = 0      # element offset of this piece inside the key
    numel: int = 0       # elements in this piece
    extra: int = 0
    dtype: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(VERSION, self.op, self.dtype, self.flags, self.worker, self.key, self.clock, self.req,
                            self.offset, self.numel, self.extra)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        if len(data) != HEADER_BYTES:
            raise ValueError(f"ps wire: header of {len(data)} bytes, expected {HEADER_BYTES}")
        version, op, dtype, flags, worker, key, clock, req, offset, numel, extra = _HEADER.unpack(data)
        if version != VERSION:
            raise ValueError(f"ps wire: message version {version}, this build speaks {VERSION}")
        if dtype not in DTYPES:
            raise ValueError(f"ps wire: unknown dtype code {dtype}")
        try:
            op = Op(op)
        except ValueError:
            raise ValueError(f"ps wire: unknown op code {op}") from None
        return cls(op, worker, key, clock, req, offset, numel, extra, dtype, flags)

    def reply(self, op: Op, **fields) -> Header:
        """The answer's header: same worker, key, request id and piece."""
        base = dict(worker=self.worker, key=self.key, clock=self.clock, req=self.req, offset=self.offset,
                    numel=self.numel, dtype=self.dtype, flags=self.flags)
        base.update(fields)
        return Header(op, **base)


def dtype_code(dtype: np.dtype) -> int:
    code = DTYPE_CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise ValueError(f"ps wire: dtype {dtype} is not supported; use float32 or float64")
    return code


def payload_array(header: Header, frame: memoryview | bytes) -> np.ndarray:
    """A read-only view of the payload frame as the array the header describes (no copy)."""
    array = np.frombuffer(frame, dtype=DTYPES[header.dtype])
    if array.size != header.numel:
        raise ValueError(f"ps wire: {header.op.name} for key {header.key} says {header.numel} elements, "
                         f"payload holds {array.size}")
    return array
