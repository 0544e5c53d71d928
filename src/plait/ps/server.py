"""A parameter server process: holds pieces of keys, applies the optimizer, answers pulls under the consistency model.

Single-threaded event loop over one ROUTER socket. State machine per request:

    INIT  -> store the piece if new (first writer wins), ACK with the worker's clock on it (for resume)
    PUSH  -> duplicate (clock already recorded)? ACK only. Else BSP: add to the clock's sum; SSP/ASP: apply now.
             Record the clock, ACK, then complete BSP clocks and answer pulls that became ready.
    PULL  -> a pull at clock c means the worker pushed c (so pushes lost to a server restart still count);
             answer now if the consistency model allows, else park it until a push, goodbye or drop allows it.
    BYE   -> the worker leaves the clock.

Every `checkpoint_every` optimizer updates the shard is checkpointed atomically; a restarted server resumes from it
and workers simply resend what was not acknowledged (see kvstore.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plait.experiment.metrics import MetricsLog
from plait.ps.checkpoint import ServerSnapshot, ShardState, load_shards, save_shards
from plait.ps.consistency import ClockTable, Consistency
from plait.ps.optim import OptimizerConfig, ShardOptimizer
from plait.ps.transport import ServerTransport
from plait.ps.wire import DTYPES, Flag, Header, Op, payload_array


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    index: int
    endpoint: str                      # e.g. tcp://127.0.0.1:0 (a free port) or tcp://0.0.0.0:5000
    num_workers: int
    consistency: str = "bsp"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint_every: int = 100        # optimizer updates between checkpoints (0: only at shutdown)
    worker_timeout_s: float = 30.0
    state_dir: str = "."               # checkpoint, endpoint file and event log live here
    resume: bool = True                # start from this server's checkpoint when one exists

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"server {self.index}: num_workers must be >= 1, got {self.num_workers}")
        if self.checkpoint_every < 0 or self.worker_timeout_s <= 0:
            raise ValueError("sync.checkpoint_every must be >= 0 and sync.worker_timeout_s > 0")
        Consistency.parse(self.consistency)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.state_dir) / f"server-{self.index}.npz"

    @property
    def endpoint_path(self) -> Path:
        return Path(self.state_dir) / f"server-{self.index}.endpoint"

    @property
    def log_path(self) -> Path:
        return Path(self.state_dir) / f"server-{self.index}.jsonl"


class ParameterServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.consistency = Consistency.parse(config.consistency)
        self.optimizer = ShardOptimizer(config.optimizer)
        now = time.monotonic()
        self.clocks = ClockTable(config.num_workers, config.worker_timeout_s, now)
        self.shards: dict[int, ShardState] = {}
        self.sums: dict[int, dict[int, list]] = {}      # BSP: key -> clock -> [sum of grads, count]
        self.pending: dict[tuple[int, int], tuple[bytes, Header]] = {}  # (worker, req) -> parked pull
        self.in_flight: dict[int, list] = {}             # key -> trackers of zero-copy sends of its weights
        self.updates = 0
        self.updates_at_checkpoint = 0
        self.bytes_in = self.bytes_out = 0
        self.transport = ServerTransport()
        self.log = MetricsLog(config.log_path)
        self.running = True
        if config.resume and config.checkpoint_path.exists():
            self._restore(load_shards(config.checkpoint_path))

    # -- state ------------------------------------------------------------------------------------------------
    def _restore(self, snapshot: ServerSnapshot) -> None:
        self.shards = snapshot.shards
        for key, shard in self.shards.items():
            self.clocks.add_key(key, shard.clocks)
        for worker in snapshot.finished:
            self.clocks.finish(worker)
        self.updates = self.updates_at_checkpoint = snapshot.updates
        self._event("restored", keys=len(self.shards), updates=self.updates)

    def checkpoint(self) -> None:
        started = time.perf_counter()
        for key, shard in self.shards.items():
            shard.clocks = list(self.clocks.clocks[key])
        save_shards(self.config.checkpoint_path,
                    ServerSnapshot(self.shards, sorted(self.clocks.finished), self.updates))
        self.updates_at_checkpoint = self.updates
        self._event("checkpoint", updates=self.updates, seconds=time.perf_counter() - started)

    def _event(self, event: str, **fields) -> None:
        self.log.write({"event": event, "server": self.config.index, "time": time.time(), **fields})

    # -- loop -------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        endpoint = self.transport.bind(self.config.endpoint)
        tmp = self.config.endpoint_path.with_suffix(".tmp")
        tmp.write_text(endpoint)
        tmp.replace(self.config.endpoint_path)  # the launcher reads it only once complete
        self._event("listening", endpoint=endpoint, consistency=str(self.consistency))
        poll_s = min(0.1, self.config.worker_timeout_s / 4)
        try:
            while self.running:
                message = self.transport.recv_msg(poll_s)
                if message is not None:
                    self.handle(*message)
                self._drop_silent()
        finally:
            self._event("stopped", updates=self.updates, bytes_in=self.bytes_in, bytes_out=self.bytes_out)
            self.transport.close()
            self.log.close()

    def handle(self, peer: bytes, header: Header, payload: memoryview | None) -> None:
        self.bytes_in += len(payload) if payload is not None else 0
        if header.flags & Flag.OBSERVER:
            if header.op == Op.PULL:
                self._answer_pull(peer, header, observer=True)
            return
        if header.op == Op.SHUTDOWN:
            self.checkpoint()
            self.transport.send_msg(peer, header.reply(Op.ACK))
            self.running = False
            return
        if not 0 <= header.worker < self.config.num_workers:
            self._error(peer, header, f"worker id {header.worker} outside 0..{self.config.num_workers - 1}")
            return
        if self.clocks.seen(header.worker, time.monotonic()):
            self._event("rejoined", worker=header.worker)
        if header.op == Op.INIT:
            self._init(peer, header, payload)
        elif header.op == Op.PUSH:
            self._push(peer, header, payload)
        elif header.op == Op.PULL:
            self._pull(peer, header)
        elif header.op == Op.BYE:
            self.clocks.finish(header.worker)
            self.transport.send_msg(peer, header.reply(Op.ACK))
            self._event("finished", worker=header.worker)
            self._progress()
        else:
            self._error(peer, header, f"unexpected op {header.op.name}")

    def _error(self, peer: bytes, header: Header, text: str) -> None:
        message = f"server {self.config.index}, {header.op.name} key {header.key}: {text}"
        self.transport.send_msg(peer, header.reply(Op.ERROR, numel=0), np.frombuffer(message.encode(), np.uint8))

    def _shard(self, peer: bytes, header: Header) -> ShardState | None:
        shard = self.shards.get(header.key)
        if shard is None:
            self._error(peer, header, "key was never initialised (call init first)")
        elif shard.offset != header.offset or shard.param.size != header.numel \
                or shard.param.dtype != DTYPES[header.dtype]:
            self._error(peer, header, f"piece [{header.offset}, +{header.numel}) does not match the stored piece "
                                      f"[{shard.offset}, +{shard.param.size}): do all workers use the same sharding?")
            shard = None
        return shard

    def _init(self, peer: bytes, header: Header, payload: memoryview | None) -> None:
        if header.key not in self.shards:
            if payload is None:
                self._error(peer, header, "INIT without a value")
                return
            param = payload_array(header, payload).copy()  # owned and writable
            self.shards[header.key] = ShardState(header.offset, param, self.optimizer.init(param), [])
            self.clocks.add_key(header.key)
        if self._shard(peer, header) is not None:
            clock = self.clocks.clocks[header.key][header.worker]
            self.transport.send_msg(peer, header.reply(Op.ACK, extra=clock))

    def _push(self, peer: bytes, header: Header, payload: memoryview | None) -> None:
        shard = self._shard(peer, header)
        if shard is None:
            return
        if payload is None:
            self._error(peer, header, "PUSH without a gradient")
            return
        row = self.clocks.clocks[header.key]
        if header.clock > row[header.worker]:  # else a resent duplicate: acknowledge, do not apply twice
            grad = payload_array(header, payload)
            if self.consistency.aggregates:
                slot = self.sums.setdefault(header.key, {}).get(header.clock)
                if slot is None:
                    self.sums[header.key][header.clock] = [grad.copy(), 1]
                else:
                    slot[0] += grad
                    slot[1] += 1
            else:
                # Each push is 1/N of a clock's step, so one lr means the same step size under all three models.
                self._writable(header.key)
                self.optimizer.apply(shard.param, grad, shard.opt_state, 1.0 / self.config.num_workers)
                self.updates += 1
            self.clocks.advance(header.key, header.worker, header.clock)
        self.transport.send_msg(peer, header.reply(Op.ACK, numel=0))
        self._progress(header.key)

    def _pull(self, peer: bytes, header: Header) -> None:
        if self._shard(peer, header) is None:
            return
        if header.clock >= 0:
            self.clocks.advance(header.key, header.worker, header.clock)
        self._complete_clocks(header.key)
        if self.clocks.ready(header.key, header.clock, self.consistency):
            self._answer_pull(peer, header)
        else:
            self.pending[(header.worker, header.req)] = (peer, header)  # a resend replaces its first copy

    def _answer_pull(self, peer: bytes, header: Header, observer: bool = False) -> None:
        shard = self.shards.get(header.key)
        if shard is None:
            self._error(peer, header, "key was never initialised (call init first)")
            return
        staleness = 0 if observer else self.clocks.staleness_seen(header.key, header.clock)
        slowest = min(self.clocks.slowest(header.key), 2**62)
        reply = header.reply(Op.VALUE, offset=shard.offset, numel=shard.param.size, extra=staleness, clock=slowest)
        # Zero-copy: ZeroMQ reads the live weights while sending; `_writable` copies them first if an update
        # comes before the send is done.
        tracker = self.transport.send_msg(peer, reply, shard.param, track=True)
        if tracker is not None:
            self.in_flight.setdefault(header.key, []).append(tracker)
        self.bytes_out += shard.param.nbytes

    def _writable(self, key: int) -> None:
        """Copy-on-write: before updating a key's weights in place, move them to a fresh buffer if a pull answer
        is still being sent from the current one (the old buffer stays alive with ZeroMQ until sent)."""
        trackers = self.in_flight.get(key)
        if trackers and not all(t.done for t in trackers):
            shard = self.shards[key]
            shard.param = shard.param.copy()
        self.in_flight.pop(key, None)

    # -- progress ---------------------------------------------------------------------------------------------
    def _complete_clocks(self, key: int) -> None:
        """BSP: apply each clock's mean gradient once every live worker pushed it (clocks in order)."""
        sums = self.sums.get(key)
        if not sums:
            return
        slowest = self.clocks.slowest(key)
        shard = self.shards[key]
        for clock in sorted(c for c in sums if c <= slowest):
            total, count = sums.pop(clock)
            self._writable(key)
            self.optimizer.apply(shard.param, total, shard.opt_state, 1.0 / count)
            self.updates += 1

    def _progress(self, key: int | None = None) -> None:
        for k in ([key] if key is not None else list(self.shards)):
            self._complete_clocks(k)
        for ident, (peer, header) in list(self.pending.items()):
            if (key is None or header.key == key) and self.clocks.ready(header.key, header.clock, self.consistency):
                del self.pending[ident]
                self._answer_pull(peer, header)
        every = self.config.checkpoint_every
        if every and self.updates - self.updates_at_checkpoint >= every:
            self.checkpoint()

    def _drop_silent(self) -> None:
        busy = {worker for worker, _ in self.pending}
        dropped = self.clocks.drop_silent(time.monotonic(), busy)
        if dropped:
            for worker in dropped:
                self._event("dropped", worker=worker, reason=f"silent for {self.config.worker_timeout_s} s")
            self._progress()


def run_server(config: ServerConfig) -> None:
    # The loop is single-threaded by design; a multi-threaded BLAS axpy (optim.py) would fight ZeroMQ's I/O thread
    # for the cores. Read once, when the server's first update loads BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    ParameterServer(config).serve()
