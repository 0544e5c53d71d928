"""Which requests a parameter server serves: the checks in front of `ParameterServer.handle`, in order.

    1. may the sender's key send this op, and under this worker id (trust.py; every peer may without CurveZMQ)
    2. the replication protocol's own messages go to replication.ReplicaHandlers
    3. can the request be served at all (`_problem`: its worker, clock, payload length, the stored pieces)
    4. admission (`_admission`): an INIT that would create a piece needs a key that may create one; values must
       be finite

A request refused at any step is answered with an ERROR naming the key, counted by reason (refusals.py) and changes
no state. Apart from server.py so that each holds one job; `ParameterServer` inherits `RequestChecks`.
"""

from __future__ import annotations

import struct
import time

import numpy as np

from plait.ps.checkpoint import ShardState
from plait.ps.consistency import NO_LIVE_WORKER
from plait.ps.refusals import CountedLog
from plait.ps.server_config import ServerConfig, Slot, slot_of
from plait.ps.transport import PARTNER, ServerTransport
from plait.ps.trust import Role, Trust
from plait.ps.wire import DTYPES, Flag, Header, Op, payload_array

SEEDER = -1  # the worker id of an INIT that only creates pieces (the launcher's, before any worker starts)


def all_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())


class RequestChecks:
    """The checks above, a mixin of server.ParameterServer (which owns the attributes below)."""

    config: ServerConfig
    shards: dict[Slot, ShardState]
    trust: Trust
    transport: ServerTransport
    refusals: CountedLog

    def handle_safely(self, peer: bytes, header: Header, payload: memoryview | None, key: str | None = None) -> None:
        """`handle` behind the checks of the whole request: may the sender's key send it (trust.py), can it be
        served (`_problem`), are its values finite. A request refused is answered with an ERROR naming the key,
        counted by reason, and changes no state (a dropped worker named in it does not even rejoin). The try is a
        last net, so that one request the checks missed cannot end the server."""
        role = self.trust.role(key)
        # PARTNER: the answers on our own link to the partner replica, whose server key the handshake checked
        reason, problem = "unauthorised", None if peer == PARTNER else (
            self.trust.refusal(role, header.op) or self.trust.impersonation(key, role, header))
        if problem is None and self.replica is not None and self._replication(peer, header, payload):
            return
        if problem is None:
            reason, problem = "unservable", self._problem(header, payload)
        if problem is None:
            reason, problem = self._admission(header, payload, role)
        if problem is None:
            try:
                self.handle(peer, header, payload)
                return
            except (ValueError, struct.error) as error:
                reason, problem = "unservable", str(error)
        self._refuse(peer, header, reason, problem)
        self._error(peer, header, problem)

    def _admission(self, header: Header, payload: memoryview | None, role: Role) -> tuple[str, str | None]:
        """After `_problem`: (reason, why) a well-formed request is still refused, or (reason, None)."""
        if header.op == Op.INIT and slot_of(header) not in self.shards and not self.trust.may_create(role):
            return "unauthorised", "creating a piece takes a control key (sync.curve_keys: DIR/control/)"
        if header.op in (Op.INIT, Op.PUSH, Op.PUSHPULL) and not all_finite(payload_array(header, payload)):
            return "nonfinite", "the values hold NaN or Inf: refused, nothing applied"
        return "", None

    def _problem(self, header: Header, payload: memoryview | None) -> str | None:
        """What makes this request unservable, or None. Reads state, never changes it."""
        op = header.op
        if header.flags & Flag.OBSERVER:
            return None if op == Op.PULL else f"an observer may only PULL, not {op.name}"
        if op == Op.SHUTDOWN:
            return None
        if op not in (Op.INIT, Op.PUSH, Op.PULL, Op.PUSHPULL, Op.BYE):
            return f"unexpected op {op.name}"
        if op == Op.INIT and header.worker == SEEDER:
            pass  # the launcher creating pieces: counted in no clock
        elif not 0 <= header.worker < self.config.num_workers:
            return f"worker id {header.worker} outside 0..{self.config.num_workers - 1}"
        if not -1 <= header.clock < NO_LIVE_WORKER:  # clocks stay below it, and so fit every field of a reply
            return f"clock {header.clock} outside [-1, 2**62)"
        if op == Op.BYE:
            return None
        if op in (Op.INIT, Op.PUSH, Op.PUSHPULL):
            if payload is None:
                return f"{op.name} without a value"
            if len(payload) != header.numel * DTYPES[header.dtype].itemsize:
                return (f"says {header.numel} {DTYPES[header.dtype]} elements, the payload holds {len(payload)} "
                        "bytes")
        if op == Op.INIT:
            if header.numel < 1:
                return "INIT of an empty piece (numel 0)"
            if slot_of(header) not in self.shards and not self._overlaps_stored(header):
                return None  # a new piece
        return self._shard_problem(header)

    def _shard_problem(self, header: Header) -> str | None:
        shard = self.shards.get(slot_of(header))
        if shard is not None and shard.param.size == header.numel and shard.param.dtype == DTYPES[header.dtype]:
            return None
        stored = [f"[{s.offset}, +{s.param.size})" for (k, _), s in sorted(self.shards.items()) if k == header.key]
        if not stored:
            return "key was never initialised (call init first)"
        return (f"piece [{header.offset}, +{header.numel}) does not match the stored pieces {', '.join(stored)}: "
                "do all workers use the same sharding?")

    def _refuse(self, peer: bytes, header: Header | None, reason: str, text: str) -> None:
        """Count a refusal; the log gets a count and a sample per interval (refusals.py), not a line each."""
        self.refusals.count(reason, time.monotonic(), peer=peer.hex(), op=header.op.name if header else None,
                            key=header.key if header else None, worker=header.worker if header else None, text=text)

    def _overlaps_stored(self, header: Header) -> bool:
        """A new piece overlapping a stored one means the workers' sharding differs (servers, piece size, key size):
        `_problem` then refuses it, naming the stored pieces, instead of keeping two copies of some elements."""
        lo, hi = header.offset, header.offset + header.numel
        return any(k == header.key and s.offset < hi and lo < s.offset + s.param.size
                   for (k, _), s in self.shards.items())
