"""Who may send what to a parameter server, and where a server may listen without CurveZMQ: the trust model in code
(docs/security.md, "Parameter server").

Without CurveZMQ a server cannot tell its peers apart, so every peer that reaches it is trusted with everything.
That is safe on loopback only, where a peer is a process of this host; a server binding beyond loopback without
`sync.curve_keys` refuses to start unless `sync.insecure_bind = true` (`plait ps server --insecure`) says that its
network is trusted. With CurveZMQ a peer is known by the key it presented in the handshake (security.py), and the
role of that key decides what it may send:

    role      its key                               may send
    worker    authorized/ (worker-<r>.key,          PUSH, PULL, PUSHPULL; INIT of a piece the server holds
              client.key)
    control   control/ (launcher.key)               the above, INIT that creates a piece, BYE, SHUTDOWN
    server    server.key (a partner replica)        REPLICATE, HELLO

So a worker's key cannot end a run, take a worker out of the clocks or make a server hold new pieces. Nor can it
speak for another worker: a key listed in workers/ as worker-<r>.key is bound to worker id r, and a PUSH, PULL,
PUSHPULL or INIT from it under another id is refused; once a directory binds any key, a worker key bound to none
(client.key, the evaluator's) may only read as an observer. `plait ps keys DIR --workers N` makes the bound keys,
and the local launcher issues the ones its workers lack. A directory that binds no key (made before bindings
existed, or without --workers) keeps the old rule: its worker keys may use any worker id.
"""

from __future__ import annotations

import enum
import ipaddress

from plait.ps.security import CurveKeys
from plait.ps.wire import Flag, Header, Op


class Role(enum.Enum):
    TRUSTED = "trusted"     # no CurveZMQ: every peer may send everything
    WORKER = "worker"
    CONTROL = "control"
    SERVER = "server"


_WORKER_OPS = frozenset({Op.PUSH, Op.PULL, Op.PUSHPULL, Op.INIT})
MAY_SEND: dict[Role, frozenset[Op]] = {
    Role.WORKER: _WORKER_OPS,                         # INIT: of a held piece only (`may_create`)
    Role.CONTROL: _WORKER_OPS | {Op.BYE, Op.SHUTDOWN},
    Role.SERVER: frozenset({Op.REPLICATE, Op.HELLO}),
}


class Trust:
    """The roles of the keys a server knows (none without CurveZMQ: every peer is TRUSTED)."""

    def __init__(self, curve: CurveKeys | None):
        self.curve = curve is not None
        self.server_key = curve.server_key() if curve is not None else ""
        self.control_keys = curve.control_keys() if curve is not None else set()
        self.worker_ids = curve.worker_bindings() if curve is not None else {}  # public key -> its worker id

    def role(self, key: str | None) -> Role:
        """The role of a peer that presented `key` (its Z85 public key; None without CurveZMQ)."""
        if not self.curve:
            return Role.TRUSTED
        if key == self.server_key:
            return Role.SERVER
        return Role.CONTROL if key in self.control_keys else Role.WORKER

    @staticmethod
    def refusal(role: Role, op: Op) -> str | None:
        """Why a peer of `role` may not send `op`, or None."""
        if role is Role.TRUSTED or op in MAY_SEND[role]:
            return None
        allowed = [other.value for other, ops in MAY_SEND.items() if op in ops]
        return (f"{op.name} from a {role.value} key: " + (f"only {' or '.join(allowed)} keys may send it"
                if allowed else "no peer may send it") + " (sync.curve_keys, docs/security.md)")

    def impersonation(self, key: str | None, role: Role, header: Header) -> str | None:
        """Why a worker key may not send this request under `header.worker` (another worker's id), or None."""
        if role is not Role.WORKER or header.op not in _WORKER_OPS or header.flags & Flag.OBSERVER:
            return None  # control keys may use any id; an observer only reads and is counted in no clock
        bound = self.worker_ids.get(key or "")
        op = header.op.name
        if bound is not None:
            return None if header.worker == bound else (
                f"{op} as worker {header.worker} from worker {bound}'s key: a worker key speaks for its own worker "
                "id only (sync.curve_keys: DIR/workers/)")
        if not self.worker_ids:
            return None  # a directory that binds no key: the old rule, any id
        return (f"{op} as worker {header.worker} from a worker key bound to no worker id: each worker presents its "
                f"own key (DIR/worker-{header.worker}.key_secret, `plait ps keys DIR --workers N`); other worker "
                "keys may only read as observers")

    @staticmethod
    def may_create(role: Role) -> bool:
        """Whether an INIT from this role may create a piece the server does not hold."""
        return role in (Role.TRUSTED, Role.CONTROL)


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach ("localhost", 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, an interface or "*": it may be reachable from elsewhere


def endpoint_is_local(endpoint: str) -> bool:
    """An endpoint only processes of this host can reach: ipc://, inproc:// or tcp:// on a loopback address."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    return is_loopback(address.rpartition(":")[0] if ":" in address else address)


def check_bind(endpoint: str, curve_keys: str, insecure_bind: bool, who: str) -> None:
    """Refuse (ValueError naming the settings) to serve beyond loopback without CurveZMQ, unless told to."""
    if curve_keys or insecure_bind or endpoint_is_local(endpoint):
        return
    raise ValueError(f"{who} would listen on {endpoint}, beyond loopback, without CurveZMQ: any host that reaches it "
                     "could end the run (SHUTDOWN), push values or make it hold new pieces. Set sync.curve_keys "
                     "(`plait ps keys DIR`), bind to 127.0.0.1, or, on a network you trust, set "
                     "sync.insecure_bind = true (`plait ps server --insecure`)")
