"""Primary-backup replication of a server's key range (`sync.replication = 2`), as ps-lite's replicated servers.

Every key range (server index i) is held by two server processes, replica 0 and replica 1 of i, one the primary and
the other its backup. Workers talk to the primary. The primary streams each change of its state to the backup, in
order and numbered (`Op.REPLICATE`, `req` = sequence number, `extra` = `Change`), and the backup replays it with the
same code (server.py), so both hold bit-identical shards, optimizer state, clocks and pending BSP sums. A reply to a
worker (ACK or VALUE: the acknowledgement of its push) is held until the backup has acknowledged every change made
before it: an acknowledged update is always on both replicas.

Roles, one state machine per server process:

    fresh start:  replica 0 -> PRIMARY, replica 1 -> JOINING
    JOINING -> BACKUP   send HELLO to the partner until its SNAPSHOT arrives. A restarted server always joins and
                        never takes the range back: the live replica holds every acknowledged update and serves on.
    BACKUP  -> PRIMARY  when a worker asks it (its primary did not answer) and the primary has been silent for
                        `failover_s` (a primary sends a HEARTBEAT when it has nothing else to send), or when its
                        primary comes back restarted (its HELLO)
    PRIMARY -> JOINING  two primaries (one was paused while the other took over): the one serving alone may have
                        acknowledged updates only it holds, so the one still streaming yields (if both serve alone,
                        replica 1 yields). Its unacknowledged changes are dropped; it catches up as a backup
    JOINING + HELLO from a joining partner (the whole job restarted): replica 0 serves from its checkpoint.

A primary whose backup stops acknowledging for `failover_s` (dead) releases the held replies and serves alone until
the backup's restart says HELLO; it then sends a SNAPSHOT (the checkpoint format, sums included) and is replicated
again. Serving alone, it still sends heartbeats, outside the stream: a backup that was only slow hears that its
primary lives (so it does not take over) and joins again. So one server killed at any moment loses nothing acknowledged; a second failure before the first one's
replacement has caught up can. The processes are assumed to fail by stopping: one paused for longer than
`failover_s` while its partner takes over can lose the updates it acknowledged alone meanwhile.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.ps.transport import ServerTransport
from plait.ps.wire import Header, Op


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"
    JOINING = "joining"


class Change(enum.IntEnum):
    """What a REPLICATE message carries (its `extra`); the backup replays it (server.ParameterServer._replay)."""
    HEARTBEAT = 0   # nothing changed; the primary is alive
    SNAPSHOT = 1    # the whole state (payload: checkpoint.snapshot_bytes); starts a stream
    INIT = 2        # a new piece (payload: its value)
    PUSH = 3        # a push recorded: summed (BSP) or applied (SSP, ASP), its clock advanced (payload: gradient)
    COMPLETE = 4    # BSP: clock `clock` of the piece applied from its sum
    ADVANCE = 5     # a pull counted as the worker's push of `clock`
    ROW = 6         # a piece's whole clock row (payload: int64 per worker): a rejoined worker was caught up


@dataclass(slots=True)
class _Held:
    seq: int                    # released once the backup acknowledged this change
    peer: bytes
    header: Header
    payload: np.ndarray | None


class Replica:
    """The replication link of one server process: its role, the numbered stream to or from the partner, and the
    worker replies held until the backup has what they acknowledge."""

    def __init__(self, transport: ServerTransport, replica: int, partner: str, failover_s: float, fresh: bool,
                 now: float):
        self.transport = transport
        self.replica = replica
        self.partner = partner          # an endpoint, or a path to the partner's endpoint file (local launcher)
        self.failover_s = failover_s
        # Replica 1 of a fresh job joins as replica 0's backup; a restarted server always joins.
        self.role = Role.PRIMARY if fresh and replica == 0 else Role.JOINING
        self.connected = False
        self.seq = 0                    # primary: last change sent; backup: last change replayed
        self.acked = 0                  # primary: last change the backup acknowledged
        self.in_sync = False            # primary: the backup holds the snapshot and every change since
        self.last_heard = now           # from the partner: its ACKs (primary), its changes (backup)
        self.last_sent = now
        self.hello_at = float("-inf")
        self.held: deque[_Held] = deque()
        self.awake_at = now             # when this process last ran its loop

    # -- link ---------------------------------------------------------------------------------------------------
    def connect(self) -> bool:
        """Connect once the partner's endpoint is known (a local partner writes it to a file when it binds)."""
        if not self.connected:
            endpoint = self.partner
            if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                path = Path(endpoint)
                if not path.exists():
                    return False
                endpoint = path.read_text().strip()
            self.transport.connect_partner(endpoint)
            self.connected = True
        return True

    def send_change(self, change: Change, now: float, payload=None, **fields) -> None:
        """Primary: stream one change to the backup (nothing while it has none in sync)."""
        if self.role is not Role.PRIMARY or not self.in_sync:
            return
        self.seq += 1
        self.transport.send_partner(Header(Op.REPLICATE, req=self.seq, extra=int(change), **fields), payload)
        self.last_sent = now

    def start_stream(self, snapshot: bytes, now: float) -> None:
        """Primary: the partner asked to be the backup (HELLO): send the whole state, then every change."""
        self.in_sync = True
        self.last_heard = now
        self.send_change(Change.SNAPSHOT, now, np.frombuffer(snapshot, np.uint8), numel=len(snapshot))

    # -- replies to workers -------------------------------------------------------------------------------------
    def reply(self, peer: bytes, header: Header, payload: np.ndarray | None) -> bool:
        """Hold a reply while the backup lacks a change made before it; True if held (sent later by `release`)."""
        if self.role is not Role.PRIMARY or not self.in_sync or self.acked >= self.seq:
            return False
        # A copy: the live weights may change before the backup's ACK comes.
        self.held.append(_Held(self.seq, peer, header, None if payload is None else payload.copy()))
        return True

    def on_ack(self, seq: int, now: float) -> None:
        self.acked = max(self.acked, seq)
        self.last_heard = now
        self._release(lambda held: held.seq <= self.acked)

    def _release(self, due) -> None:
        while self.held and due(self.held[0]):
            held = self.held.popleft()
            self.transport.send_msg(held.peer, held.header, held.payload)

    # -- roles --------------------------------------------------------------------------------------------------
    def promote(self) -> None:
        """Serve the range, alone until the partner (restarted) says HELLO."""
        self.role, self.in_sync, self.acked = Role.PRIMARY, False, self.seq

    def demote(self) -> None:
        """Another primary took over: drop the held replies (their changes may be lost; the workers resend) and
        catch up from it as a backup."""
        self.role, self.in_sync = Role.JOINING, False
        self.held.clear()
        self.hello_at = float("-inf")

    def awake(self, now: float) -> None:
        """Called every loop iteration and before every judgement of the partner's silence. After a pause of this very process (stopped, starved of CPU), the partner's
        silence says nothing: what it sent is still queued here. Restart the count, so that a backup waking up
        does not take over from a live primary, nor a primary give up on a live backup."""
        if now - self.awake_at > self.failover_s / 2:
            self.last_heard = now
        self.awake_at = now

    def primary_silent(self, now: float) -> bool:
        self.awake(now)
        return now - self.last_heard > self.failover_s

    def tick(self, now: float) -> str | None:
        """Timers: heartbeats, a dead backup, HELLO resends. Returns an event to log, or None."""
        self.awake(now)
        if not self.connect():
            return None
        if self.role is Role.PRIMARY and self.in_sync:
            if self.acked < self.seq and now - self.last_heard > self.failover_s:
                self.in_sync = False  # the backup is gone: serve alone until its restart says HELLO
                self._release(lambda held: True)
                return "backup_lost"
            if now - self.last_sent > self.failover_s / 4:
                self.send_change(Change.HEARTBEAT, now)
        elif self.role is Role.PRIMARY and now - self.last_sent > self.failover_s / 4:
            # Serving alone: a heartbeat outside any stream (req 0). A backup that was only slow, not dead, learns
            # from it that its primary is alive (it must not take over) and that it missed changes (it joins again).
            self.transport.send_partner(Header(Op.REPLICATE, req=0, extra=int(Change.HEARTBEAT)))
            self.last_sent = now
        elif self.role is Role.JOINING and now - self.hello_at > self.failover_s / 2:
            self.hello_at = now
            self.transport.send_partner(Header(Op.HELLO, extra=self.replica))
        return None
