"""CurveZMQ between parameter-server hosts: traffic encrypted, servers that serve only peers holding a known key, and
each peer known by its key (what it may send is trust.py's).

Off by default (a trusted cluster network, as ps-lite assumes); `sync.curve_keys = "DIR"` turns it on for every
server, worker, evaluator and the launcher. `plait ps keys DIR` makes the directory:

    DIR/server.key, DIR/server.key_secret      the servers' keypair (one for all servers of the job); a replica
                                                presents it to its partner
    DIR/worker-<r>.key, DIR/worker-<r>.key_secret   worker r's keypair (`plait ps keys DIR --workers N`; the local
                                                launcher issues the missing ones): push and pull as worker r only
    DIR/client.key, DIR/client.key_secret      the evaluators' keypair (and the workers' in a directory without
                                                worker keys): push and pull only
    DIR/launcher.key, DIR/launcher.key_secret  the launcher's: creates the model's pieces, says SHUTDOWN
    DIR/authorized/                            the public keys servers complete a handshake with (client, launcher,
                                                server, workers; drop more .key files here to admit more peers)
    DIR/control/                               the public keys that may send control messages (launcher; add more)
    DIR/workers/worker-<r>.key                 the key bound to worker id r (trust.py refuses other ids from it)

A server host needs server.key, server.key_secret, authorized/, control/ and workers/; worker r's host server.key
and worker-<r>.key_secret (client.key_secret for an evaluator); the launcher's host launcher.key_secret too. A peer
without an accepted key completes no handshake: the server never sees its messages, and it waits until its own
timeout. The handshake (CurveZMQ, RFC 26) authenticates both ends and encrypts every frame after it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CLIENT, LAUNCHER, SERVER = "client", "launcher", "server"   # the keypairs of a key directory, by who presents them
WORKER_PREFIX = "worker-"                                   # worker r presents the keypair "worker-<r>"


def worker_identity(rank: int) -> str:
    return f"{WORKER_PREFIX}{rank}"


def is_worker_identity(identity: str) -> bool:
    """A keypair that may only push and pull (a worker's or the shared client one): it says no BYE."""
    return identity == CLIENT or identity.startswith(WORKER_PREFIX)


@dataclass(frozen=True, slots=True)
class CurveKeys:
    directory: Path
    identity: str = CLIENT         # the keypair this process presents when it connects

    @classmethod
    def from_setting(cls, value: str | Path | None, identity: str = CLIENT) -> CurveKeys | None:
        """`sync.curve_keys` as given ("" or None: CurveZMQ off)."""
        return cls(Path(value), identity) if value else None

    def presenting(self, identity: str) -> CurveKeys:
        return dataclasses.replace(self, identity=identity)

    def for_worker(self, rank: int) -> CurveKeys:
        """What worker `rank` presents: its own keypair where the directory holds one, else the shared client's."""
        own = worker_identity(rank)
        return self.presenting(own) if rank >= 0 and (self.directory / f"{own}.key_secret").is_file() else self

    def _load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        path = self.directory / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.is_file():
            raise FileNotFoundError(f"sync.curve_keys: {path} is missing (make the directory with "
                                    f"`plait ps keys {self.directory}`)")
        try:
            return zmq.auth.load_certificate(path)
        except ValueError as err:
            raise ValueError(f"sync.curve_keys: {path} is not a CurveZMQ certificate: {err}") from err

    def _folder(self, name: str, what: str) -> Path:
        folder = self.directory / name
        if not folder.is_dir():
            raise FileNotFoundError(f"sync.curve_keys: {folder} ({what}) is missing; a directory made before it "
                                    f"existed needs new keys: `plait ps keys` into an empty directory")
        return folder

    def secure_server(self, socket: zmq.Socket, context: zmq.Context) -> ThreadAuthenticator:
        """Make `socket` (before bind) a CURVE server that accepts only the authorized client keys; returns the
        authenticator thread, to stop when the socket closes. Each message it receives then carries the sender's
        public key as its "User-Id" property (Z85 text)."""
        public, secret = self._load(SERVER, secret=True)
        authorized = self._folder("authorized", "the accepted keys")
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_server = True
        return auth

    def secure_client(self, socket: zmq.Socket) -> None:
        """Make `socket` (before connect) a CURVE client that presents this process's keypair (`identity`)."""
        server_public, _ = self._load(SERVER, secret=False)
        public, secret = self._load(self.identity, secret=True)
        socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server_public

    def server_key(self) -> str:
        """The servers' public key (Z85), which a partner replica presents."""
        return self._load(SERVER, secret=False)[0].decode("ascii")

    def control_keys(self) -> set[str]:
        """The public keys (Z85) that may send control messages: every .key file in control/."""
        folder = self._folder("control", "the keys that may send control messages")
        return {zmq.auth.load_certificate(path)[0].decode("ascii") for path in sorted(folder.glob("*.key"))}


    def worker_bindings(self) -> dict[str, int]:
        """Public key (Z85) -> the worker id it is bound to: every workers/worker-<r>.key. Empty for a directory
        without worker keys (made before they existed, or without --workers): its worker keys may use any id."""
        folder = self.directory / "workers"
        bindings: dict[str, int] = {}
        for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
            rank = path.stem.removeprefix(WORKER_PREFIX)
            if not path.stem.startswith(WORKER_PREFIX) or not rank.isdigit():
                raise ValueError(f"sync.curve_keys: {path} is not named worker-<rank>.key (the name binds the key "
                                 "to its worker id)")
            bindings[zmq.auth.load_certificate(path)[0].decode("ascii")] = int(rank)
        return bindings


def _create(directory: Path, names: list[str]) -> dict[str, str]:
    """New keypairs `names` in `directory`; their public key files by name."""
    previous = os.umask(0o077)  # secret keys are private from the moment they exist: no window before a chmod
    try:
        return {name: zmq.auth.create_certificates(directory, name)[0] for name in names}
    finally:
        os.umask(previous)


def _publish(directory: Path, public: dict[str, str], folders: dict[str, list[str]]) -> None:
    """Copy each public key into the folders that list it (authorized/, control/, workers/), readable by all."""
    for folder, names in folders.items():
        (directory / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(public[name], directory / folder / f"{name}.key")
            (directory / folder / f"{name}.key").chmod(0o644)
    for name in public:
        (directory / f"{name}.key").chmod(0o644)


def make_keys(directory: str | Path, workers: int = 0) -> CurveKeys:
    """Create the key directory described above, with keys bound to worker ids 0..workers-1 (refuses to overwrite
    existing keys)."""
    directory = Path(directory)
    if any((directory / f"{name}.key_secret").exists() for name in (SERVER, CLIENT, LAUNCHER)):
        raise FileExistsError(f"{directory} already holds keys; remove them first to make new ones")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    for folder in ("authorized", "control", "workers"):
        (directory / folder).mkdir(parents=True, exist_ok=True)
    public = _create(directory, [SERVER, CLIENT, LAUNCHER])
    _publish(directory, public, {"authorized": [CLIENT, LAUNCHER, SERVER], "control": [LAUNCHER]})
    issue_worker_keys(directory, workers)
    return CurveKeys(directory)


def issue_worker_keys(directory: str | Path, workers: int) -> list[int]:
    """Keys bound to worker ids 0..workers-1 that `directory` does not hold yet (the local launcher's first step
    under CurveZMQ, before its servers read the directory); the ranks it made."""
    directory = Path(directory)
    missing = [rank for rank in range(workers)
               if not (directory / f"{worker_identity(rank)}.key_secret").exists()]
    names = [worker_identity(rank) for rank in missing]
    if names:
        _publish(directory, _create(directory, names), {"authorized": names, "workers": names})
    return missing
