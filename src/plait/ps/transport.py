"""ZeroMQ transport, four methods as ps-lite's Van: bind, connect, send_msg, recv_msg.

Servers bind a ROUTER socket (it tags each request with the sender's identity, so one socket serves every
worker); a worker connects one DEALER socket per server, so requests to different servers are in flight at once and
each server sees one worker's messages in the order they were sent. ZeroMQ reconnects a DEALER by itself when a
server restarts on the same endpoint; the client resends what was lost (see kvstore.py).

Payloads are sent zero-copy (`copy=False`): ZeroMQ reads the array's memory directly, so the sender must not modify
it until the message is gone. The worker keeps each gradient alive and unchanged until its push is acknowledged;
the server sends its live weights, tracked, and updates them copy-on-write while a send is still in progress.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from plait.ps.security import SERVER, CurveKeys
from plait.ps.wire import Header, MalformedMessage

# Below this size ZeroMQ copies anyway and a tracker costs more than the copy.
TRACK_MIN_BYTES = 1 << 16

# `ServerTransport.recv_msg`'s peer for a message that came over the link to the partner replica (a ROUTER
# identity is never empty, so it cannot be a worker's).
PARTNER = b""


def _payload_frames(header: Header, payload: np.ndarray | None) -> list:
    frames: list = [header.pack()]
    if payload is not None:
        if not payload.flags.c_contiguous:
            raise ValueError(f"ps transport: payload for key {header.key} must be contiguous")
        frames.append(payload)
    return frames


class ServerTransport:
    def __init__(self, context: zmq.Context | None = None, curve: CurveKeys | None = None,
                 max_message_bytes: int = -1):
        # A CURVE server gets a context of its own: its authenticator binds the context's one ZAP address, so two
        # servers (or a server and its restart) in one process could not share a context.
        self._own_context = curve is not None and context is None
        self._context = zmq.Context() if self._own_context else context or zmq.Context.instance()
        self._max_message_bytes = max_message_bytes
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block a reply: queues are bounded by the workers
        self._socket.setsockopt(zmq.RCVHWM, 0)
        # ZeroMQ reads a frame's size before it allocates the frame: a larger one ends that peer's connection, the
        # server never holds it, and every other peer is served on.
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # Connection events: ZeroMQ tells of a cut-off peer (an oversized frame) only as a disconnect, and of a
        # refused CurveZMQ handshake as a failed one. Counted in `connection_events`, read by the server.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.connection_events: Counter[str] = Counter()
        self._auth = None
        self._curve = curve
        self._link: zmq.Socket | None = None   # DEALER to the partner replica (sync.replication = 2)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        if curve is not None:
            try:
                self._auth = curve.secure_server(self._socket, self._context)
            except Exception:
                self.close()
                raise

    def bind(self, endpoint: str) -> str:
        """Bind and return the endpoint actually bound (a port of 0 or * picks a free port)."""
        self._socket.bind(endpoint.replace(":0", ":*") if endpoint.endswith(":0") else endpoint)
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send_msg(self, peer: bytes, header: Header, payload: np.ndarray | None = None, track: bool = False):
        """Send to `peer`; returns a zmq.MessageTracker when `track` and the payload is large, else None."""
        frames = [peer, *_payload_frames(header, payload)]
        track = track and payload is not None and payload.nbytes >= TRACK_MIN_BYTES
        return self._socket.send_multipart(frames, copy=False, track=track) if track else \
            self._socket.send_multipart(frames, copy=False)

    def connect_partner(self, endpoint: str) -> None:
        """Open the link to the partner replica: this server's replication stream and HELLOs go out on it, the
        partner's ACKs come back on it (and are read by `recv_msg` with peer PARTNER)."""
        link = self._context.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.RECONNECT_IVL, 50),
                              (zmq.RECONNECT_IVL_MAX, 500), (zmq.MAXMSGSIZE, self._max_message_bytes)):
            link.setsockopt(option, value)
        if self._curve is not None:
            self._curve.presenting(SERVER).secure_client(link)  # the partner knows a server by the servers' key
        link.connect(endpoint)
        self._link = link
        self._poller.register(link, zmq.POLLIN)

    def send_partner(self, header: Header, payload: np.ndarray | bytes | None = None) -> bool:
        """Queue a message to the partner replica; False when it cannot be queued now (no connection yet)."""
        frames: list = [header.pack()] if payload is None else [header.pack(), payload]
        try:
            self._link.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv_msg(self, timeout_s: float) -> tuple[bytes, Header, memoryview | None, str | None] | None:
        """The next request, or None after `timeout_s`: (sender's identity, header, payload, sender's CurveZMQ public
        key in Z85, None without CurveZMQ). Raises MalformedMessage (naming the sender) for one that is not a request
        at all. ROUTER always prepends the sender's identity frame; a message from the link to the partner replica
        comes with peer PARTNER."""
        ready = dict(self._poller.poll(int(timeout_s * 1000)))
        if self._monitor in ready:
            self._count_connection_events()
        if self._link is not None and self._link in ready:
            frames = self._link.recv_multipart(copy=False)
            try:
                return (PARTNER, Header.unpack(frames[0].buffer), frames[1].buffer if len(frames) > 1 else None,
                        None)
            except ValueError as error:
                raise MalformedMessage(PARTNER, str(error)) from None
        if self._socket not in ready:
            return None
        frames = self._socket.recv_multipart(copy=False)
        peer = frames[0].bytes
        if len(frames) < 2:
            raise MalformedMessage(peer, "ps wire: a message without a header frame")
        try:
            header = Header.unpack(frames[1].buffer)
        except ValueError as error:
            raise MalformedMessage(peer, str(error)) from None
        key = frames[1].get("User-Id") if self._curve is not None else None  # set by the CurveZMQ authenticator
        return peer, header, frames[2].buffer if len(frames) > 2 else None, key

    def _count_connection_events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            self.connection_events["disconnected" if event == zmq.EVENT_DISCONNECTED else "handshake"] += 1

    def close(self) -> None:
        if self._link is not None:
            self._link.close(linger=0)
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._context.term()


class WorkerTransport:
    def __init__(self, context: zmq.Context | None = None, reconnect_ms: int = 50, curve: CurveKeys | None = None):
        self._context = context or zmq.Context.instance()
        self._reconnect_ms = reconnect_ms
        self._curve = curve
        self._sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._index: dict[zmq.Socket, int] = {}

    def connect(self, endpoints: list[str]) -> None:
        for endpoint in endpoints:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.RCVHWM, 0)
            socket.setsockopt(zmq.RECONNECT_IVL, self._reconnect_ms)
            socket.setsockopt(zmq.RECONNECT_IVL_MAX, 10 * self._reconnect_ms)
            if self._curve is not None:
                self._curve.secure_client(socket)
            socket.connect(endpoint)
            self._index[socket] = len(self._sockets)
            self._sockets.append(socket)
            self._poller.register(socket, zmq.POLLIN)

    @property
    def num_servers(self) -> int:
        return len(self._sockets)

    def send_msg(self, server: int, header: Header, payload: np.ndarray | None = None) -> bool:
        """Queue a request; False when the server has no usable connection right now (a CurveZMQ handshake it
        refused leaves none, and a blocking send would then hang): the caller resends later, as for a lost one."""
        try:
            self._sockets[server].send_multipart(_payload_frames(header, payload), copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv_msg(self, timeout_s: float) -> tuple[int, Header, memoryview | None] | None:
        """One message from whichever server answers first, or None after `timeout_s`."""
        for socket, _ in self._poller.poll(int(timeout_s * 1000)):
            frames = socket.recv_multipart(copy=False)
            return self._index[socket], Header.unpack(frames[0].buffer), \
                frames[1].buffer if len(frames) > 1 else None
        return None

    def close(self) -> None:
        for socket in self._sockets:
            socket.close(linger=0)
        self._sockets.clear()
