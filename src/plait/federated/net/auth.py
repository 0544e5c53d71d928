"""Per-client authentication: every call is signed with the client's own key and carries a fresh nonce.

A client's key is HMAC(master secret, "plait-fl-client:<id>"), so the server keeps one secret for any number of
clients and `plait fl certs` hands each client only its own key. The signature covers the method, the client id, a
timestamp and a random nonce; the server refuses a bad or missing signature, a timestamp outside the replay window,
and a nonce it has already seen inside that window (a replayed request). Message bodies are protected by TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from plait.federated.net.wire import WireError

H_CLIENT, H_TIME, H_NONCE, H_SIG = "x-plait-client", "x-plait-time", "x-plait-nonce", "x-plait-sig"


def derive_client_key(master: bytes, client_id: int) -> bytes:
    return hmac.new(master, f"plait-fl-client:{client_id}".encode(), hashlib.sha256).digest()


def read_key(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: key file {str(path)!r} does not exist")
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except ValueError as err:
        raise ValueError(f"{what}: {path} is not a hex key: {err}") from err
    if len(key) < 16:
        raise ValueError(f"{what}: {path} holds a {len(key)}-byte key; at least 16 bytes are needed")
    return key


def _message(method: str, client_id: int, timestamp: str, nonce: str) -> bytes:
    return f"{method}\n{client_id}\n{timestamp}\n{nonce}".encode()


def sign(key: bytes, method: str, client_id: int) -> list[tuple[str, str]]:
    """gRPC metadata for one call."""
    timestamp, nonce = f"{time.time():.6f}", secrets.token_hex(16)
    sig = hmac.new(key, _message(method, client_id, timestamp, nonce), hashlib.sha256).hexdigest()
    return [(H_CLIENT, str(client_id)), (H_TIME, timestamp), (H_NONCE, nonce), (H_SIG, sig)]


class Verifier:
    """Checks signed metadata; remembers nonces for the replay window (bounded: oldest forgotten first)."""

    def __init__(self, master: bytes | None, window_s: float, max_nonces: int = 1_000_000, max_keys: int = 100_000):
        self.master, self.window_s, self.max_nonces, self.max_keys = master, window_s, max_nonces, max_keys
        self._keys: dict[int, bytes] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, method: str, metadata: Mapping[str, str], client_id: int) -> None:
        """Raises WireError('unauthenticated' | 'replay') unless the call is signed by `client_id`'s key."""
        if self.master is None:
            return  # net.auth = "none" (loopback only)
        claimed, timestamp = metadata.get(H_CLIENT), metadata.get(H_TIME)
        nonce, sig = metadata.get(H_NONCE), metadata.get(H_SIG)
        if not (claimed and timestamp and nonce and sig):
            raise WireError("unauthenticated", f"{method}: unsigned request (no client signature)")
        if claimed != str(client_id):
            raise WireError("unauthenticated", f"{method}: signed as client {claimed}, request names {client_id}")
        key = self._keys.get(client_id) or derive_client_key(self.master, client_id)
        expected = hmac.new(key, _message(method, client_id, timestamp, nonce), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise WireError("unauthenticated", f"{method}: bad signature for client {client_id}")
        if client_id not in self._keys:  # cached only for clients that proved they hold it, and bounded
            if len(self._keys) >= self.max_keys:
                self._keys.pop(next(iter(self._keys)))
            self._keys[client_id] = key
        try:
            age = time.time() - float(timestamp)
        except ValueError:
            raise WireError("unauthenticated", f"{method}: unreadable timestamp {timestamp!r}") from None
        if abs(age) > self.window_s:
            raise WireError("replay", f"{method}: request is {age:.0f} s old; the window is {self.window_s:.0f} s "
                                      "(replayed, or the clocks disagree)")
        self._forget(time.monotonic())
        if nonce in self._seen:
            raise WireError("replay", f"{method}: nonce already used (replayed request)")
        self._seen[nonce] = time.monotonic()

    def _forget(self, now: float) -> None:
        while self._seen and (len(self._seen) >= self.max_nonces
                              or now - next(iter(self._seen.values())) > 2 * self.window_s):
            self._seen.popitem(last=False)
