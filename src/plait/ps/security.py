"""CurveZMQ between parameter-server hosts: traffic encrypted, and servers that serve only peers holding a known key.

Off by default (a trusted cluster network, as ps-lite assumes); `sync.curve_keys = "DIR"` turns it on for every
server, worker, evaluator and the launcher. `plait ps keys DIR` makes the directory:

    DIR/server.key, DIR/server.key_secret    the servers' keypair (one for all servers of the job)
    DIR/client.key, DIR/client.key_secret    the keypair workers, evaluators and the launcher present
    DIR/authorized/client.key                 the public keys servers accept (drop more client .key files here)

A server host needs server.key_secret and authorized/; a worker host needs server.key and client.key_secret. A
peer without an accepted key completes no handshake: the server never sees its messages, and it waits until its
own timeout. The handshake (CurveZMQ, RFC 26) authenticates both ends and encrypts every frame after it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


@dataclass(frozen=True, slots=True)
class CurveKeys:
    directory: Path

    @classmethod
    def from_setting(cls, value: str | Path | None) -> CurveKeys | None:
        """`sync.curve_keys` as given ("" or None: CurveZMQ off)."""
        return cls(Path(value)) if value else None

    def _load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        path = self.directory / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.is_file():
            raise FileNotFoundError(f"sync.curve_keys: {path} is missing (make the directory with "
                                    f"`plait ps keys {self.directory}`)")
        try:
            return zmq.auth.load_certificate(path)
        except ValueError as err:
            raise ValueError(f"sync.curve_keys: {path} is not a CurveZMQ certificate: {err}") from err

    def secure_server(self, socket: zmq.Socket, context: zmq.Context) -> ThreadAuthenticator:
        """Make `socket` (before bind) a CURVE server that accepts only the authorized client keys; returns the
        authenticator thread, to stop when the socket closes."""
        public, secret = self._load("server", secret=True)
        authorized = self.directory / "authorized"
        if not authorized.is_dir():
            raise FileNotFoundError(f"sync.curve_keys: {authorized} (the accepted client keys) is missing")
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_server = True
        return auth

    def secure_client(self, socket: zmq.Socket) -> None:
        """Make `socket` (before connect) a CURVE client that presents the job's client key."""
        server_public, _ = self._load("server", secret=False)
        public, secret = self._load("client", secret=True)
        socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server_public


def make_keys(directory: str | Path) -> CurveKeys:
    """Create the key directory described above (refuses to overwrite existing keys)."""
    directory = Path(directory)
    if (directory / "server.key_secret").exists() or (directory / "client.key_secret").exists():
        raise FileExistsError(f"{directory} already holds keys; remove them first to make new ones")
    (directory / "authorized").mkdir(parents=True, exist_ok=True)
    previous = os.umask(0o077)  # secret keys are private from the moment they exist: no window before a chmod
    try:
        zmq.auth.create_certificates(directory, "server")
        client_public, _ = zmq.auth.create_certificates(directory, "client")
    finally:
        os.umask(previous)
    shutil.copy(client_public, directory / "authorized" / "client.key")
    for public in [*directory.glob("*.key"), directory / "authorized" / "client.key"]:
        public.chmod(0o644)  # public keys stay readable
    return CurveKeys(directory)
