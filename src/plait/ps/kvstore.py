"""The worker's client: a KVStore in the style of MXNet's, over ps-lite-like timestamps.

    kv = KVStore(["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"], worker=0)
    kv.init(0, params)            # blocking; the first worker's value wins, the others reuse it
    ts = kv.push(0, grad)         # returns at once; `grad` must stay unchanged until the push is waited on
    ts2 = kv.pull(0, out=params)  # fills `out` when waited on
    kv.wait(ts2)                  # or ts2.wait()
    kv.pushpull(0, grad, params).wait()   # both, piece by piece (MXNet's pushpull)

Values are 1-D-able numpy arrays or CPU torch tensors (used through `.numpy()` views, no copy). Each key is split
across the servers by `plan_shards`, and each server's range into pieces of at most `piece_numel` elements; a push
sends every piece, a pull gathers every piece straight into `out`. `pushpull` sends push and pull piece by piece,
so a server answers piece i's pull while piece i+1's push is still arriving. The n-th push of a key carries clock
n-1, and a pull carries the last clock pushed, so the servers enforce the consistency model without extra messages.

Fault tolerance: every request is kept until answered and resent (same request id, same clock) when no answer came
within `retry_s` (doubling up to 8x). ZeroMQ reconnects to a restarted server by itself; the server drops the
duplicates a resend can create. While blocked on a pull, the resends double as a heartbeat.

Replicated servers (`backups`, sync.replication = 2): each range has two endpoints, and requests go to the one that
served last. A request resent twice without an answer, or answered NOT_PRIMARY, moves its range to the other
replica (see replication.py); whichever replica answers, the answer counts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plait.ps.consistency import NO_LIVE_WORKER
from plait.ps.security import CurveKeys, is_worker_identity
from plait.ps.sharding import DEFAULT_PIECE_NUMEL, Piece, plan_shards
from plait.ps.transport import WorkerTransport
from plait.ps.wire import Flag, Header, Op, dtype_code, payload_array


class Ts(int):
    """A request timestamp (an int, as ps-lite's); `ts.wait()` is `kv.wait(ts)`."""

    _store: KVStore

    def wait(self) -> None:
        self._store.wait(self)


@dataclass(slots=True)
class _Request:
    server: int                   # the socket it went to (a range's primary or backup replica)
    header: Header
    payload: np.ndarray | None
    out: np.ndarray | None
    sent_at: float
    attempts: int = 1
    done: bool = False
    reply: Header | None = None
    replica_range: int = -1       # the range whose replicas it may move between (-1: this socket only)
    redirects: int = 0            # NOT_PRIMARY answers it got
    moved: bool = False           # moved to the other replica by a NOT_PRIMARY and not sent there yet

    @property
    def answer(self) -> Header:
        """The reply of a request that was waited for."""
        if self.reply is None:
            raise RuntimeError(f"ps request {self.header.req} ({self.header.op.name}) has no reply yet")
        return self.reply


@dataclass(slots=True)
class _Key:
    numel: int
    dtype: np.dtype
    pieces: list[Piece]
    clock: int = -1


@dataclass(slots=True)
class KVStats:
    bytes_sent: int = 0           # payload bytes handed to ZeroMQ, resends included
    bytes_received: int = 0
    resends: int = 0              # requests sent again (a send that could not be queued is not counted)
    caught_up: int = 0            # times the servers moved this worker's clock on (after it had been dropped)
    last_staleness: int = 0       # staleness the last waited pull saw (max over its pieces)
    max_staleness: int = 0
    wait_s: float = 0.0           # time spent blocked in wait()
    last_slowest: int = -1        # the slowest live worker's clock, as the last waited pull reported it
    extras: dict[str, Any] = field(default_factory=dict)


def _as_array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: a view of its memory
        if value.device.type != "cpu":
            raise ValueError(f"ps {what}: tensors must be on the CPU, got {value.device}")
        value = value.detach().numpy()
    array = np.asarray(value)
    if not array.flags.c_contiguous:
        raise ValueError(f"ps {what}: the array must be contiguous")
    return array.reshape(-1)


class KVStore:
    def __init__(self, endpoints: list[str], worker: int, *, retry_s: float = 1.0, timeout_s: float = 300.0,
                 observer: bool = False, piece_numel: int = DEFAULT_PIECE_NUMEL,
                 curve_keys: str | Path | CurveKeys | None = None, backups: list[str] | None = None):
        if not endpoints:
            raise ValueError("ps: at least one server endpoint is needed")
        if retry_s <= 0 or timeout_s <= 0:
            raise ValueError("sync.retry_s and sync.wait_timeout_s must be > 0")
        if backups and len(backups) != len(endpoints):
            raise ValueError(f"ps: {len(backups)} backup endpoints for {len(endpoints)} servers (sync.replication = 2 "
                             "needs one backup per server, in the same order)")
        self.endpoints = list(endpoints)
        self.backups = list(backups or [])
        # Socket s serves range s (replica 0); socket S + s is its backup. `_target[s]`: where range s goes now.
        self._target = list(range(len(self.endpoints)))
        self.worker = -1 if observer else worker
        self.observer = observer
        self.retry_s, self.timeout_s = retry_s, timeout_s
        self.piece_numel = piece_numel
        # CurveZMQ when set (security.py), presenting this worker's own key (or the shared client one) unless a
        # CurveKeys names another
        self.curve = curve_keys if isinstance(curve_keys, CurveKeys) else CurveKeys.from_setting(curve_keys)
        if self.curve is not None and not isinstance(curve_keys, CurveKeys):
            self.curve = self.curve.for_worker(self.worker)
        self.transport = WorkerTransport(curve=self.curve)
        self.transport.connect(self.endpoints + self.backups)
        self.keys: dict[int, _Key] = {}
        self.stats = KVStats()
        self._ids = itertools.count(1)
        self._outstanding: dict[int, _Request] = {}   # request id -> request, in sending order
        self._tickets: dict[int, list[_Request]] = {}
        self._heard: set[int] = set()                  # servers that ever answered

    # -- API ----------------------------------------------------------------------------------------------------
    def init(self, key: int | dict[int, Any], value: Any = None) -> None:
        """Register keys with their initial values and wait until every server holds its pieces. The keys of one
        call are sharded together (balanced by size). On a resumed run, the servers keep their values and report
        this worker's clocks, so pushes continue where they stopped."""
        values = {key: value} if not isinstance(key, dict) else dict(key)
        arrays = {k: _as_array(v, f"init key {k}") for k, v in values.items()}
        for k in arrays:
            if k in self.keys:
                raise ValueError(f"ps init: key {k} is already initialised")
        plan = plan_shards({k: a.size for k, a in arrays.items()}, len(self.endpoints), self.piece_numel)
        requests = []
        for k, array in arrays.items():
            self.keys[k] = _Key(array.size, array.dtype, plan[k])
            if self.observer:
                continue  # an observer only reads: it learns the layout, the workers provide the values
            for piece in plan[k]:
                part = array[piece.offset: piece.offset + piece.numel]
                requests += self._send(piece.server, Op.INIT, k, -1, piece, payload=part)
        if self.observer:
            return
        self.wait(self._ticket(requests))
        for k in arrays:  # resume: continue after the last clock every server recorded for this worker
            clocks = [r.answer.extra for r in requests if r.header.key == k]
            self.keys[k].clock = min(clocks)

    def push(self, key: int, grad: Any) -> Ts:
        spec = self._key(key, "push")
        array = _as_array(grad, f"push key {key}")
        self._check(spec, array, key, "push")
        spec.clock += 1
        requests = []
        for piece in spec.pieces:
            requests += self._send(piece.server, Op.PUSH, key, spec.clock, piece,
                                   payload=array[piece.offset: piece.offset + piece.numel])
        return self._ticket(requests)

    def pull(self, key: int, out: Any) -> Ts:
        spec = self._key(key, "pull")
        array = _as_array(out, f"pull key {key}")
        self._check(spec, array, key, "pull")
        requests = []
        for piece in spec.pieces:
            requests += self._send(piece.server, Op.PULL, key, spec.clock, piece,
                                   out=array[piece.offset: piece.offset + piece.numel])
        return self._ticket(requests)

    def pushpull(self, key: int, grad: Any, out: Any) -> Ts:
        """`push(key, grad)` then `pull(key, out)` as one ticket, their pieces interleaved on the wire."""
        spec = self._key(key, "pushpull")
        array, target = _as_array(grad, f"push key {key}"), _as_array(out, f"pull key {key}")
        self._check(spec, array, key, "push")
        self._check(spec, target, key, "pull")
        spec.clock += 1
        requests = []
        for piece in spec.pieces:  # one message per piece, each answered by its value
            part = slice(piece.offset, piece.offset + piece.numel)
            requests += self._send(piece.server, Op.PUSHPULL, key, spec.clock, piece, payload=array[part],
                                   out=target[part])
        return self._ticket(requests)

    def skip(self, key: int, out: Any) -> Ts:
        """Count this worker's next clock as pushed without a gradient (a step skipped: its loss or gradient was not
        finite) and pull. A server takes a pull ahead of the clock it recorded as that clock's push (server.py), so
        under BSP the clock completes with the others' gradients and nobody waits for this worker's."""
        self._key(key, "skip").clock += 1
        return self.pull(key, out)

    def clock(self, key: int) -> int:
        """The last clock this worker pushed on `key` (-1 before the first push)."""
        return self._key(key, "clock").clock

    def wait(self, ts: int) -> None:
        requests = self._tickets.pop(int(ts), None)
        if requests is None:
            return  # already waited on
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        while not all(r.done for r in requests):
            now = time.monotonic()
            if now > deadline:
                late = next(r for r in requests if not r.done)
                raise TimeoutError(
                    f"ps worker {self.worker}: {late.header.op.name} of key {late.header.key} at clock "
                    f"{late.header.clock} unanswered by {self._name(late.server)} "
                    f"after {self.timeout_s} s (stage: wait; raise sync.wait_timeout_s if a straggler is expected"
                    f"{self._never_heard_hint(late.server)})")
            self._resend_due(now)
            message = self.transport.recv_msg(min(self.retry_s, max(deadline - now, 0.001)) / 2)
            if message is not None:
                self._on_reply(*message)
        pulls = [r.answer for r in requests if r.answer.op == Op.VALUE]
        if pulls:
            self.stats.last_staleness = max(reply.extra for reply in pulls)
            self.stats.last_slowest = min(reply.clock for reply in pulls)
            self.stats.max_staleness = max(self.stats.max_staleness, self.stats.last_staleness)
            if not self.observer:
                self._follow_catch_up(pulls)
        self.stats.wait_s += time.perf_counter() - started

    def _follow_catch_up(self, pulls: list[Header]) -> None:
        """A live worker's own clock is never below the slowest live clock, unless the servers moved it on: it had
        been dropped and, back under BSP or SSP, was caught up with the others (consistency.ClockTable.catch_up).
        Then this worker's clock follows, and the trainer skips the clocks that were completed without it."""
        for key in {reply.key for reply in pulls}:
            slowest = min(reply.clock for reply in pulls if reply.key == key)
            spec = self.keys.get(key)
            if spec is not None and spec.clock < slowest < NO_LIVE_WORKER:
                spec.clock = slowest
                self.stats.caught_up += 1

    def _name(self, socket: int) -> str:
        servers = len(self.endpoints)
        if socket < servers:
            return f"server {socket} ({self.endpoints[socket]})"
        return f"server {socket - servers} replica 1 ({self.backups[socket - servers]})"

    def _never_heard_hint(self, server: int) -> str:
        if server in self._heard:
            return ""
        keys = f"the job's keys in {self.curve.directory}" if self.curve else "no keys (sync.curve_keys unset)"
        return (f"; server {server} never answered at all: check its endpoint, and that it expects CurveZMQ "
                f"exactly when this worker uses it, here with {keys}")

    def cancel_all(self) -> None:
        """Forget every unanswered request (an evaluator that gave up on a wait; late answers are ignored)."""
        self._outstanding.clear()
        self._tickets.clear()

    def close(self, goodbye: bool = True) -> None:
        """Leave the clocks (so no server waits for this worker) and close the sockets. Under CurveZMQ only a control
        key may take a worker out of the clocks (trust.py): with the workers' key there is no goodbye, and the
        servers drop this worker after sync.worker_timeout_s instead."""
        if goodbye and not self.observer and self.worker >= 0 and (self.curve is None
                                                                   or not is_worker_identity(self.curve.identity)):
            try:
                requests = []
                for socket in range(self.transport.num_servers):  # every replica: each keeps its own clocks
                    requests += self._send(socket, Op.BYE, 0, -1, Piece(socket, 0, 0), fixed=True)
                self.timeout_s = min(self.timeout_s, 5.0)
                self.wait(self._ticket(requests))
            except TimeoutError:
                pass  # a server that is gone does not need a goodbye
        self.transport.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(goodbye=exc[0] is None)

    # -- internals ----------------------------------------------------------------------------------------------
    def _key(self, key: int, what: str) -> _Key:
        spec = self.keys.get(key)
        if spec is None:
            raise KeyError(f"ps {what}: key {key} was never initialised on this worker (call init first)")
        return spec

    @staticmethod
    def _check(spec: _Key, array: np.ndarray, key: int, what: str) -> None:
        if array.size != spec.numel or array.dtype != spec.dtype:
            raise ValueError(f"ps {what} key {key}: got {array.size} {array.dtype} values, "
                             f"the key holds {spec.numel} {spec.dtype}")

    def _send(self, server: int, op: Op, key: int, clock: int, piece: Piece, payload: np.ndarray | None = None,
              out: np.ndarray | None = None, fixed: bool = False) -> list[_Request]:
        """Send to range `server`'s serving replica (to socket `server` itself when `fixed`)."""
        dtype = payload.dtype if payload is not None else out.dtype if out is not None else np.dtype(np.float32)
        header = Header(op, worker=self.worker, key=key, clock=clock, req=next(self._ids), offset=piece.offset,
                        numel=piece.numel, dtype=dtype_code(dtype),
                        flags=Flag.OBSERVER if self.observer else Flag.NONE)
        replicated = bool(self.backups) and not fixed
        request = _Request(self._target[server] if replicated else server, header, payload, out, time.monotonic(),
                           replica_range=server if replicated else -1)
        self._outstanding[header.req] = request
        if self.transport.send_msg(request.server, header, payload):  # else not queued now: resent after retry_s
            self.stats.bytes_sent += payload.nbytes if payload is not None else 0
        return [request]

    def _ticket(self, requests: list[_Request]) -> Ts:
        ts = Ts(requests[0].header.req if requests else next(self._ids))
        ts._store = self
        self._tickets[int(ts)] = requests
        return ts

    def _resend_due(self, now: float) -> None:
        for request in list(self._outstanding.values()):  # in sending order: a push goes again before its pull
            interval = self.retry_s * min(2 ** (request.attempts - 1), 8)
            if now - request.sent_at > interval:
                if request.replica_range >= 0 and request.attempts >= 2 and not request.moved:
                    self._switch_replica(request)  # twice unanswered: the replica may be dead, try its partner
                request.moved = False
                if self.transport.send_msg(request.server, request.header, request.payload):
                    self.stats.resends += 1
                    self.stats.bytes_sent += request.payload.nbytes if request.payload is not None else 0
                request.sent_at, request.attempts = now, request.attempts + 1

    def _switch_replica(self, request: _Request) -> None:
        """Move the request's range to the other replica (once, however many of its requests notice)."""
        servers = len(self.endpoints)
        if request.server == self._target[request.replica_range]:
            current = self._target[request.replica_range]
            self._target[request.replica_range] = current + servers if current < servers else current - servers
        request.server = self._target[request.replica_range]

    def _on_reply(self, server: int, header: Header, payload: memoryview | None) -> None:
        self._heard.add(server)
        request = self._outstanding.get(header.req)
        if request is None:
            return  # the answer to a resent duplicate, already handled
        if header.op == Op.NOT_PRIMARY:
            if request.replica_range >= 0 and server == request.server:
                self._switch_replica(request)
                request.redirects += 1
                if request.redirects <= 2:  # at once; beyond, at the resend timer (both may be joining)
                    self.transport.send_msg(request.server, request.header, request.payload)
                    request.sent_at = time.monotonic()
                else:
                    request.moved = True  # the timer sends it there, without moving it back first
            return
        if header.op == Op.ACK and request.out is not None:
            # A PUSHPULL's push is in and its pull waits on the consistency model: resend only the pull from now on.
            # Never does an ACK finish a request that expects a value (a resent PUSHPULL can be ACKed twice).
            if request.header.op == Op.PUSHPULL:
                request.header, request.payload = request.header.reply(Op.PULL), None
            return
        del self._outstanding[header.req]
        if header.op == Op.ERROR:
            text = bytes(payload or b"").decode("utf-8", "replace")
            raise RuntimeError(f"ps worker {self.worker}: {text}")
        if header.op == Op.VALUE:
            if payload is None or request.out is None:
                raise RuntimeError(f"ps worker {self.worker}: server {server} answered a pull without a value")
            np.copyto(request.out, payload_array(header, payload))  # the one copy: wire buffer -> caller's array
            self.stats.bytes_received += len(payload)
        request.reply, request.done = header, True
