"""A parameter server process: holds pieces of keys, applies the optimizer, answers pulls under the consistency model.

Single-threaded event loop over one ROUTER socket. The server's state is per piece, a (key, offset) slot: its
weights, optimizer state and one clock per worker (see sharding.py for why a key can have several pieces here).
State machine per request:

    INIT  -> store the piece if new (first writer wins), ACK with the worker's clock on it (for resume)
    PUSH  -> duplicate (clock already recorded)? ACK only. Else BSP: add to the clock's sum; SSP/ASP: apply now.
             Record the clock, ACK, then complete BSP clocks and answer pulls that became ready.
    PULL  -> a pull at clock c means the worker pushed c (so pushes lost to a server restart still count);
             answer now if the consistency model allows, else park it until a push, goodbye or drop allows it.
    PUSHPULL -> PUSH without its ACK, then PULL; the VALUE acknowledges both, unless the pull parks: then the
             push is ACKed at once (the worker stops resending the gradient) and the VALUE follows later.
    BYE   -> the worker leaves the clock.

Every `checkpoint_every` updates of the whole shard (each piece updated once) the shard is checkpointed atomically,
pending BSP sums included. An unreplicated server also appends every change to its journal (journal.py) before
acknowledging it, so a server killed at any moment, before its first checkpoint included, restarts from its
checkpoint plus its journal with every piece it created and every push it acknowledged; workers simply resend what
was not acknowledged (see kvstore.py). A message
that is not a request is counted and dropped; a request its sender's key may not send, that contradicts itself or
holds a non-finite value gets an ERROR (admission.py checks them all before `handle`); the loop goes on. Refusals are
logged as counts (refusals.py). An update that leaves a piece non-finite all the same (an overflow) is named where it
arises, and no checkpoint is written after it: the one on disk stays the last good state.

With `sync.replication = 2` two processes hold the range, a primary and its backup (replication.py): the primary
streams every change of its state to the backup, which replays it through the same methods (`_store_piece`,
`_record_push`, `_apply_sum`), and holds each reply to a worker until the backup has what it acknowledges. The
handlers of that protocol are replication.ReplicaHandlers, which `ParameterServer` inherits; its settings are
server_config.ServerConfig.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from plait.ps.admission import SEEDER, RequestChecks, all_finite
from plait.ps.checkpoint import ShardState, load_shards
from plait.ps.consistency import ClockTable
from plait.ps.durability import Durable
from plait.ps.journal import Journal
from plait.ps.optim import ShardOptimizer
from plait.ps.refusals import CountedLog
from plait.ps.replication import Change, Replica, ReplicaHandlers, Role
from plait.ps.security import CurveKeys
from plait.ps.server_config import ServerConfig, Slot, slot_of
from plait.ps.transport import ServerTransport
from plait.ps.trust import Trust, endpoint_is_local
from plait.ps.wire import Flag, Header, MalformedMessage, Op, payload_array
from plait.runtime.metrics_log import MetricsLog

STATS_EVERY_S = 1.0        # a "stats" event (pieces held, updates applied, bytes) this often while they change

class ParameterServer(Durable, ReplicaHandlers, RequestChecks):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.consistency = config.consistency
        self.optimizer = ShardOptimizer(config.optimizer)
        now = time.monotonic()
        self.clocks = ClockTable(config.num_workers, config.worker_timeout_s, now)
        self.shards: dict[Slot, ShardState] = {}
        self.sums: dict[Slot, dict[int, list]] = {}     # BSP: slot -> clock -> [sum of grads, count]
        self.pending: dict[tuple[int, int], tuple[bytes, Header]] = {}  # (worker, req) -> parked pull
        self.in_flight: dict[Slot, list] = {}            # slot -> trackers of zero-copy sends of its weights
        self.updates = 0
        self.updates_at_checkpoint = 0
        self.bytes_in = self.bytes_out = 0
        curve = CurveKeys.from_setting(config.curve_keys)
        self.trust = Trust(curve)
        self.transport = ServerTransport(curve=curve, max_message_bytes=config.max_message_bytes)
        self.log = MetricsLog(config.log_path)
        # What is refused (refusals.py), and connections that ended (a peer that left, or one cut off for a frame
        # over max_message_bytes: ZeroMQ does not say which), each logged a count per interval, not a line each.
        self.refusals = CountedLog(self._event, "refused", config.refusal_log_s)
        self.disconnects = CountedLog(self._event, "disconnects", config.refusal_log_s)
        self.diverged: dict | None = None                # the first update that left a piece non-finite
        self.running = True
        self._stats_logged: tuple[int, int, int] | None = None  # (pieces, updates, bytes in) of the last "stats"
        self.signalled: int | None = None                # SIGTERM/SIGINT received (run_server): stop, checkpoint
        chunk_bytes = config.max_message_bytes // 2 if config.max_message_bytes > 0 else 0
        self.replica = Replica(self.transport, config.replica, config.partner_address, config.failover_s,
                               fresh=not config.resume, now=now, chunk_bytes=chunk_bytes) \
            if config.replication > 1 else None
        # unreplicated: every change on disk before it is acknowledged (a replicated range has its backup instead)
        self.journal = (Journal(config.journal_path, fresh=not config.resume)
                        if self.replica is None and config.journal else None)
        journal_seq = 0
        if config.resume and config.checkpoint_path.exists():
            journal_seq = self._restore(load_shards(config.checkpoint_path))
        if self.journal is not None:
            self._replay_journal(journal_seq)

    def _event(self, event: str, **fields) -> None:
        replica = {"replica": self.config.replica} if self.replica is not None else {}
        self.log.write({"event": event, "server": self.config.index, **replica, "time": time.time(), **fields})

    def _log_stats(self) -> None:
        """What the launcher's dashboard shows of this server (its shard, its work), logged when it changed."""
        now = (len(self.shards), self.updates, self.bytes_in)
        if now == self._stats_logged:
            return
        self._stats_logged = now
        self._event("stats", keys=len({key for key, _ in self.shards}), pieces=len(self.shards),
                    elements=sum(shard.param.size for shard in self.shards.values()), updates=self.updates,
                    bytes_in=self.bytes_in, bytes_out=self.bytes_out, refused=sum(self.refusals.totals.values()))

    # -- loop -------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        endpoint = self.transport.bind(self.config.endpoint)
        tmp = self.config.endpoint_path.with_suffix(".tmp")
        tmp.write_text(endpoint)
        tmp.replace(self.config.endpoint_path)  # the launcher reads it only once complete
        self._event("listening", endpoint=endpoint, consistency=str(self.consistency), pid=os.getpid())
        if not (self.config.curve_keys or endpoint_is_local(endpoint)):  # allowed by sync.insecure_bind alone
            print(f"warning: ps server {self.config.index} serves {endpoint} without CurveZMQ (sync.insecure_bind):"
                  " every host that reaches it is trusted with everything, SHUTDOWN included", file=sys.stderr,
                  flush=True)
            self._event("insecure_bind", endpoint=endpoint)
        poll_s = min(0.1, self.config.worker_timeout_s / 4)
        next_stats = time.monotonic()
        try:
            while self.running:
                try:
                    message = self.transport.recv_msg(poll_s)
                except MalformedMessage as error:  # not a request: nothing to answer, keep serving
                    self._refuse(error.peer, None, "malformed", str(error))
                    message = None
                self._count_connections(time.monotonic())
                if self.replica is not None:
                    self.replica.awake(time.monotonic())
                if message is not None:
                    self.handle_safely(*message)
                if self.replica is None or self.replica.role is Role.PRIMARY:
                    self._drop_silent()
                if self.replica is not None and (event := self.replica.tick(time.monotonic())):
                    self._event(event)
                if self.running and time.monotonic() >= next_stats:  # never after SHUTDOWN's final checkpoint
                    next_stats = time.monotonic() + STATS_EVERY_S
                    self._log_stats()
            if self.signalled is not None:  # stopped by SIGTERM / SIGINT: leave a final checkpoint, as SHUTDOWN
                self._event("signalled", signal=signal.Signals(self.signalled).name)
                self.checkpoint(last=True)
        finally:
            self.refusals.flush()
            self._event("stopped", updates=self.updates, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                        refused=dict(self.refusals.totals), disconnects=self.disconnects.totals.total())
            self.transport.close()
            self.log.close()
            if self.journal is not None:
                self.journal.close()

    def _count_connections(self, now: float) -> None:
        events = self.transport.connection_events
        if events:
            if events["handshake"]:
                self.refusals.count("handshake", now, times=events["handshake"])
            if events["disconnected"]:
                self.disconnects.count("disconnected", now, times=events["disconnected"])
            events.clear()
        self.refusals.tick(now)
        self.disconnects.tick(now)

    def handle(self, peer: bytes, header: Header, payload: memoryview | None) -> None:
        """Serve a request that passed the checks (admission.py)."""
        self.bytes_in += len(payload) if payload is not None else 0
        if header.flags & Flag.OBSERVER:
            self._answer_pull(peer, header, observer=True)
            return
        if header.op == Op.SHUTDOWN:
            self.checkpoint(last=True)
            self.transport.send_msg(peer, header.reply(Op.ACK))
            self.running = False
            return
        now = time.monotonic()
        if header.worker == SEEDER:  # an INIT that only creates pieces: no worker to count
            self._init(peer, header, payload)
            return
        if header.op == Op.INIT and self.clocks.start_again(header.worker, now):
            self._event("started_again", worker=header.worker)  # it had said goodbye; a resumed job needs it
        if header.op != Op.BYE and self.clocks.seen(header.worker, now):  # a goodbye is no rejoin
            # Under ASP nobody waits on clocks: a stalled worker's late gradients still count, so no jump there.
            clock = self.clocks.catch_up(header.worker) if self.consistency.name != "asp" else None
            self._event("rejoined", worker=header.worker, clock=clock)
            if clock is not None:
                for slot, row in self.clocks.clocks.items():
                    self._replicate(Change.ROW, Header(Op.REPLICATE, key=slot[0], offset=slot[1], numel=len(row)),
                                    np.asarray(row, dtype=np.int64))
        if header.op == Op.INIT:
            self._init(peer, header, payload)
        elif header.op == Op.PUSH:
            self._push(peer, header, payload)
        elif header.op == Op.PULL:
            self._pull(peer, header)
        elif header.op == Op.PUSHPULL:
            self._push(peer, header, payload, ack=False)
            self._pull(peer, header, ack_if_parked=True)
        elif header.op == Op.BYE:
            self.clocks.finish(header.worker)
            self._send(peer, header.reply(Op.ACK))
            self._event("finished", worker=header.worker)
            self._progress()

    def _error(self, peer: bytes, header: Header, text: str) -> None:
        message = f"server {self.config.index}, {header.op.name} key {header.key}: {text}"
        self.transport.send_msg(peer, header.reply(Op.ERROR, numel=0), np.frombuffer(message.encode(), np.uint8))

    # The handlers below serve requests that passed `_problem`: the piece exists (or is a new INIT) and matches,
    # the payload is there and has the stated length.
    def _init(self, peer: bytes, header: Header, payload: memoryview) -> None:
        slot = slot_of(header)
        if slot not in self.shards:  # first writer wins, piece by piece
            value = payload_array(header, payload)
            self._store_piece(slot, value)
            self._replicate(Change.INIT, header, value)
        clock = self.clocks.clocks[slot][header.worker] if header.worker != SEEDER else -1
        self._send(peer, header.reply(Op.ACK, extra=clock))

    def _store_piece(self, slot: Slot, value: np.ndarray) -> None:
        param = value.copy()  # owned and writable
        self.shards[slot] = ShardState(slot[1], param, self.optimizer.init(param), [])
        self.clocks.add_key(slot)

    def _push(self, peer: bytes, header: Header, payload: memoryview, ack: bool = True) -> None:
        slot = slot_of(header)
        if header.clock > self.clocks.clocks[slot][header.worker]:  # else a resent duplicate: ACK, do not apply
            grad = payload_array(header, payload)
            self._record_push(slot, header.worker, header.clock, grad)
            self._replicate(Change.PUSH, header, grad)
        if ack:
            self._send(peer, header.reply(Op.ACK, numel=0))
        self._progress(slot)

    def _record_push(self, slot: Slot, worker: int, clock: int, grad: np.ndarray) -> None:
        shard = self.shards[slot]
        if self.consistency.aggregates:
            pending = self.sums.setdefault(slot, {}).get(clock)
            if pending is None:
                self.sums[slot][clock] = [grad.copy(), 1]
            else:
                pending[0] += grad
                pending[1] += 1
        else:
            # Each push is 1/N of a clock's step, so one lr means the same step size under all three models.
            self._writable(slot)
            self.optimizer.apply(shard.param, grad, shard.opt_state, 1.0 / self.config.num_workers)
            self.updates += 1
            self._check_finite(slot, clock, worker)
        self.clocks.advance(slot, worker, clock)

    def _pull(self, peer: bytes, header: Header, ack_if_parked: bool = False) -> None:
        slot = slot_of(header)
        if header.clock > self.clocks.clocks[slot][header.worker]:
            # It stands in for a push lost to a restart: that can complete a BSP clock and release others' pulls.
            self.clocks.advance(slot, header.worker, header.clock)
            self._replicate(Change.ADVANCE, header)
            self._progress(slot)
        if self.clocks.ready(slot, header.clock, self.consistency):
            self._answer_pull(peer, header)
        else:
            if ack_if_parked and (header.worker, header.req) not in self.pending:  # a resend is ACKed once
                self._send(peer, header.reply(Op.ACK, numel=0))
            self.pending[(header.worker, header.req)] = (peer, header)  # a resend replaces its first copy

    def _answer_pull(self, peer: bytes, header: Header, observer: bool = False) -> None:
        slot = slot_of(header)
        shard = self.shards.get(slot)
        if shard is None:  # an observer asks without init; workers were checked by `_problem`
            self._error(peer, header, "piece was never initialised (call init first)")
            return
        staleness = 0 if observer else self.clocks.staleness_seen(slot, header.clock)
        reply = header.reply(Op.VALUE, numel=shard.param.size, extra=staleness, clock=self.clocks.slowest(slot))
        # Zero-copy: ZeroMQ reads the live weights while sending; `_writable` copies them first if an update
        # comes before the send is done.
        tracker = self._send(peer, reply, shard.param, track=True)
        if tracker is not None:
            self.in_flight.setdefault(slot, []).append(tracker)
        self.bytes_out += shard.param.nbytes

    def _writable(self, slot: Slot) -> None:
        """Copy-on-write: before updating a piece's weights in place, move them to a fresh buffer if a pull answer
        is still being sent from the current one (the old buffer stays alive with ZeroMQ until sent)."""
        trackers = self.in_flight.get(slot)
        if trackers and not all(t.done for t in trackers):
            shard = self.shards[slot]
            shard.param = shard.param.copy()
        self.in_flight.pop(slot, None)

    # -- progress ---------------------------------------------------------------------------------------------
    def _complete_clocks(self, slot: Slot) -> None:
        """BSP: apply each clock's mean gradient once every live worker pushed it (clocks in order)."""
        sums = self.sums.get(slot)
        if not sums:
            return
        slowest = self.clocks.slowest(slot)
        for clock in sorted(c for c in sums if c <= slowest):
            self._apply_sum(slot, clock)
            self._replicate(Change.COMPLETE, Header(Op.REPLICATE, key=slot[0], offset=slot[1], clock=clock))

    def _apply_sum(self, slot: Slot, clock: int) -> None:
        total, count = self.sums[slot].pop(clock)
        shard = self.shards[slot]
        self._writable(slot)
        self.optimizer.apply(shard.param, total, shard.opt_state, 1.0 / count)
        self.updates += 1
        self._check_finite(slot, clock, None)

    def _check_finite(self, slot: Slot, clock: int, worker: int | None) -> None:
        """Pushes are finite (`_admission`), but an update can still overflow (a huge gradient, a huge lr). The
        first that leaves a piece non-finite is named here, where it arises; from then on no checkpoint nor journal
        record is written, so what is on disk stays the last good state (--resume), and the workers, pulling
        non-finite weights, stop the run."""
        if self.diverged is not None or all_finite(self.shards[slot].param):
            return
        self.diverged = {"key": slot[0], "offset": slot[1], "clock": clock, "worker": worker,
                         "last_checkpoint": str(path) if (path := self.config.checkpoint_path).exists() else None,
                         "checkpoint_updates": self.updates_at_checkpoint}
        self._event("diverged", **self.diverged)
        by = f"worker {worker}'s push" if worker is not None else "the mean of the workers' pushes"
        print(f"ps server {self.config.index}: piece [{slot[1]}, +{self.shards[slot].param.size}) of key {slot[0]} "
              f"is not finite after clock {clock} ({by}); no checkpoint is written from now on, the last good one "
              f"is {self.diverged['last_checkpoint'] or 'none (no checkpoint written yet)'}", file=sys.stderr,
              flush=True)

    def _progress(self, slot: Slot | None = None) -> None:
        if self.replica is not None and self.replica.role is not Role.PRIMARY:
            return  # a backup changes only by replaying its primary's stream
        for s in ([slot] if slot is not None else list(self.shards)):
            self._complete_clocks(s)
        for ident, (peer, header) in list(self.pending.items()):
            waits_on = slot_of(header)
            if (slot is None or waits_on == slot) and self.clocks.ready(waits_on, header.clock, self.consistency):
                del self.pending[ident]
                self._answer_pull(peer, header)
        self._checkpoint_if_due()

    def _drop_silent(self) -> None:
        busy = {worker for worker, _ in self.pending}
        dropped = self.clocks.drop_silent(time.monotonic(), busy)
        if dropped:
            for worker in dropped:
                self._event("dropped", worker=worker, reason=f"silent for {self.config.worker_timeout_s} s")
            self._progress()

    # -- replies ----------------------------------------------------------------------------------------------
    def _send(self, peer: bytes, header: Header, payload: np.ndarray | None = None, track: bool = False):
        """Reply to a worker; a primary holds the reply until its backup has every change made before it."""
        if self.replica is not None and self.replica.reply(peer, header, payload):
            return None
        return self.transport.send_msg(peer, header, payload, track=track)


def run_server(config: ServerConfig) -> None:
    # The loop is single-threaded by design; a multi-threaded BLAS axpy (optim.py) would fight ZeroMQ's I/O thread
    # for the cores. Read once, when the server's first update loads BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    server = ParameterServer(config)

    def stop(signum: int, _frame) -> None:
        # Only flags: the request being handled completes, the loop ends within one poll (0.1 s at most).
        server.signalled, server.running = signum, False

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    server.serve()
