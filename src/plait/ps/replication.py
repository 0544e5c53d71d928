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
primary lives (so it does not take over) and joins again. So one server killed at any moment loses nothing
acknowledged; a second failure before the first one's replacement has caught up can. The processes are assumed to
fail by stopping: one paused for longer than `failover_s` while its partner takes over can lose the updates it
acknowledged alone meanwhile.

Here: `Replica`, the link (role, numbered stream, held replies), and `ReplicaHandlers`, the server's side of the
protocol (the partner's messages, its role changes, the replay), which server.ParameterServer inherits.
"""

from __future__ import annotations

import enum
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.ps.checkpoint import ServerSnapshot, ShardState, load_shards, snapshot_bytes
from plait.ps.consistency import ClockTable
from plait.ps.journal import Journal
from plait.ps.server_config import Slot, slot_of
from plait.ps.transport import PARTNER, ServerTransport
from plait.ps.wire import Header, Op, payload_array

WORKER_OPS = (Op.INIT, Op.PUSH, Op.PULL, Op.PUSHPULL)  # what only the primary of a replicated range serves


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"
    JOINING = "joining"


class Change(enum.IntEnum):
    """What a REPLICATE message carries (its `extra`); the backup replays it (ReplicaHandlers._replay)."""
    HEARTBEAT = 0   # nothing changed; the primary is alive
    SNAPSHOT = 1    # a chunk of the whole state (payload: bytes `offset`.. of checkpoint.snapshot_bytes, whose
                    # length is `clock`); chunk 0 starts a stream
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
                 now: float, chunk_bytes: int = 0):
        self.transport = transport
        # A snapshot travels on the socket workers use, under its max_message_bytes: in numbered chunks of at most
        # this many bytes (0: whole), so a limit sized for pieces never cuts off a shard's catch-up.
        self.chunk_bytes = chunk_bytes
        self.incoming: bytearray | None = None  # backup: the chunks of a snapshot so far
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

    def start_stream(self, snapshot: bytes, now: float) -> int:
        """Primary: the partner asked to be the backup (HELLO): send the whole state, in chunks, then every change.
        Returns the number of chunks."""
        self.in_sync = True
        self.last_heard = now
        data = np.frombuffer(snapshot, np.uint8)
        step = self.chunk_bytes or max(len(data), 1)
        offsets = range(0, max(len(data), 1), step)
        for offset in offsets:
            part = data[offset: offset + step]
            self.send_change(Change.SNAPSHOT, now, part, offset=offset, numel=len(part), clock=len(data))
        return len(offsets)

    def expects_chunk(self, header: Header) -> bool:
        """A snapshot's first chunk, or the next one of the snapshot being received. Any other (what an earlier
        stream left queued, or a gap) is ignored and unacknowledged: the HELLO resend restarts the stream."""
        if header.offset == 0 or (self.incoming is not None and header.req == self.seq + 1
                                  and header.offset == len(self.incoming)):
            return True
        self.incoming = None
        return False

    def snapshot_chunk(self, header: Header, payload: memoryview | None) -> bytes | None:
        """Backup: take one chunk of a snapshot (`expects_chunk`); returns the whole snapshot with its last chunk,
        else None. The buffer grows with the bytes received, never to a size a header states."""
        if header.offset == 0:
            self.incoming = bytearray()
        assert self.incoming is not None  # expects_chunk
        self.incoming += payload if payload is not None else b""
        if len(self.incoming) > header.clock:
            self.incoming = None
            raise ValueError(f"snapshot chunks longer than the {header.clock} bytes announced")
        if len(self.incoming) < header.clock:
            return None
        whole, self.incoming = bytes(self.incoming), None
        return whole

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
        self.incoming = None

    def awake(self, now: float) -> None:
        """Called every loop iteration and before every judgement of the partner's silence. After a pause of this
        very process (stopped, starved of CPU), the partner's silence says nothing: what it sent is still queued here.
        Restart the count, so that a backup waking up does not take over from a live primary, nor a primary give up
        on a live backup."""
        if now - self.awake_at > self.failover_s / 2:
            self.last_heard = now
        self.awake_at = now

    def primary_silent(self, now: float) -> bool:
        self.awake(now)
        return now - self.last_heard > self.failover_s

    def _receiving_since(self) -> float:
        """While a snapshot's chunks keep coming, a HELLO resend would only restart it."""
        return self.last_heard if self.incoming is not None else float("-inf")

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
        elif self.role is Role.JOINING and now - max(self.hello_at, self._receiving_since()) > self.failover_s / 2:
            self.hello_at = now
            self.transport.send_partner(Header(Op.HELLO, extra=self.replica))
        return None


class ReplicaHandlers:
    """The parameter server's side of the protocol above, a mixin of server.ParameterServer: serve the partner's
    messages, keep workers off a replica that is not the primary, stream each change of the server's state, and
    replay the primary's stream. Apart from the server loop so that each holds one job; the replay goes through the
    server's own methods (`_store_piece`, `_record_push`, `_apply_sum`), so both replicas change state the same way.
    Does nothing unless `replica` is set (sync.replication = 2)."""

    # Owned by the server (server.ParameterServer.__init__); read and changed here.
    replica: Replica | None
    transport: ServerTransport
    clocks: ClockTable
    shards: dict[Slot, ShardState]
    sums: dict[Slot, dict[int, list]]
    pending: dict[tuple[int, int], tuple[bytes, Header]]
    in_flight: dict[Slot, list]
    updates: int
    updates_at_checkpoint: int
    journal: Journal | None
    diverged: dict | None

    def _replicate(self, change: Change, header: Header, payload: np.ndarray | None = None) -> None:
        """Stream one change to the backup, or (unreplicated) append it to the journal: before its reply is sent."""
        fields = dict(worker=header.worker, key=header.key, clock=header.clock, offset=header.offset,
                      numel=header.numel, dtype=header.dtype)
        if self.replica is not None:
            self.replica.send_change(change, time.monotonic(), payload, **fields)
        elif self.journal is not None and self.diverged is None:  # after a divergence: the last good state stays
            self.journal.append(Header(Op.REPLICATE, extra=int(change), **fields), payload)

    def _replication(self, peer: bytes, header: Header, payload: memoryview | None) -> bool:
        """Serve the replication protocol's messages and keep workers off a replica that is not the primary;
        True when the message was handled here."""
        replica, now = self.replica, time.monotonic()
        if peer == PARTNER:  # the backup's answer on this primary's stream
            if header.op == Op.ACK:
                replica.on_ack(header.req, now)
            elif header.op == Op.NOT_PRIMARY and replica.role is Role.PRIMARY:
                self._demote("the partner has taken over")
            return True
        if header.op == Op.REPLICATE:
            try:
                self._replay(peer, header, payload, now)
            except (ValueError, KeyError, struct.error) as error:  # a change this state cannot take: resync
                self._refuse(peer, header, "replication", f"replication: {error!r}")
                if replica.role is Role.BACKUP:
                    replica.demote()
            return True
        if header.op == Op.HELLO:
            self._on_hello(now)
            return True
        if header.op in WORKER_OPS and replica.role is not Role.PRIMARY:
            if replica.role is Role.BACKUP and replica.primary_silent(now):
                self._promote(now, "primary silent")
                return False
            self.transport.send_msg(peer, header.reply(Op.NOT_PRIMARY, numel=0))
            return True
        return False

    def _demote(self, reason: str) -> None:
        """Another primary holds the range: drop what waits on this one (the workers resend) and catch up from it."""
        self.replica.demote()
        self.pending.clear()
        self._event("demoted", reason=reason)

    def _promote(self, now: float, reason: str) -> None:
        self.replica.promote()
        # Workers spoke to the primary, not here: their silence so far says nothing.
        self.clocks.last_seen = [max(seen, now) for seen in self.clocks.last_seen]
        self._event("promoted", reason=reason)
        self._progress()  # clocks the old primary completed but had not yet streamed

    def _on_hello(self, now: float) -> None:
        """The partner (re)started and asks to be this replica's backup."""
        replica = self.replica
        if replica.role is Role.JOINING and replica.replica != 0:
            return  # both are joining (the whole job restarted): replica 0 serves, its snapshot comes to us
        if replica.role is Role.BACKUP:
            self._promote(now, "primary restarted")  # it lost its state; ours holds every acknowledged update
        elif replica.role is Role.JOINING:
            replica.role = Role.PRIMARY
            self._event("serving", reason="both replicas restarted", updates=self.updates)
        if replica.connect():
            chunks = replica.start_stream(snapshot_bytes(self._snapshot()), now)
            self._event("streaming", updates=self.updates, chunks=chunks)

    def _replay(self, peer: bytes, header: Header, payload: memoryview | None, now: float) -> None:
        """Backup: apply one change of the primary's stream, in order, and acknowledge it."""
        replica = self.replica
        if replica.role is Role.PRIMARY:  # two primaries: one was paused and the other took over
            # The one serving alone (a heartbeat outside the stream, req 0) may have acknowledged updates that only
            # it holds: it stays, unless both serve alone (then replica 0 stays). The other one catches up from it.
            if header.req == 0 and (replica.in_sync or replica.replica == 1):
                self._demote("the partner serves alone")
            else:
                self.transport.send_msg(peer, header.reply(Op.NOT_PRIMARY, numel=0))
            return
        change = Change(header.extra)
        if header.req == 0:  # a primary serving alone (Replica.tick): it lives, and we missed changes
            replica.last_heard = now
            if replica.role is Role.BACKUP:
                replica.demote()
                self._event("rejoining", reason="the primary serves without this backup")
            return
        if change == Change.SNAPSHOT:
            if not replica.expects_chunk(header):
                return
            whole = replica.snapshot_chunk(header, payload)
            if whole is not None:
                self._adopt(load_shards(whole))
                replica.role = Role.BACKUP
                self._event("synced", updates=self.updates)
        elif replica.role is Role.JOINING:
            return  # what an earlier stream left queued; the snapshot comes first
        elif header.req != replica.seq + 1:  # a gap: the stream restarted without us; ask again
            replica.demote()
            self._event("stream_gap", expected=replica.seq + 1, got=header.req)
            return
        else:
            self._apply_change(change, header, payload)
            self._checkpoint_if_due()
        replica.seq, replica.last_heard = header.req, now
        self.transport.send_msg(peer, header.reply(Op.ACK, numel=0))

    def _apply_change(self, change: Change, header: Header, payload: memoryview | bytes | None) -> None:
        """Replay one change of the stream (a backup) or of the journal (a restarted unreplicated server)."""
        slot = slot_of(header)
        if change == Change.INIT and slot not in self.shards:
            self._store_piece(slot, payload_array(header, payload))
        elif change == Change.PUSH and header.clock > self.clocks.clocks[slot][header.worker]:
            self._record_push(slot, header.worker, header.clock, payload_array(header, payload))
        elif change == Change.COMPLETE:
            self._apply_sum(slot, header.clock)
        elif change == Change.ADVANCE:
            self.clocks.advance(slot, header.worker, header.clock)
        elif change == Change.ROW:
            self.clocks.clocks[slot] = np.frombuffer(payload or b"", np.int64).tolist()

    def _adopt(self, snapshot: ServerSnapshot) -> None:
        """Take the primary's whole state (a backup catching up)."""
        self.shards, self.sums = snapshot.shards, snapshot.sums
        self.clocks.clocks = {}
        for slot, shard in self.shards.items():
            self.clocks.add_key(slot, shard.clocks)
        for worker in snapshot.finished:
            self.clocks.finish(worker)
        self.updates = self.updates_at_checkpoint = snapshot.updates
        self.pending.clear()
        self.in_flight.clear()
