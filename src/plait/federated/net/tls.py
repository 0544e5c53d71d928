"""gRPC credentials from a `plait fl certs` directory, for the server and for one client."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist (make it with `plait fl certs`)")
    return path.read_bytes()


def server_credentials(cert_dir: str | Path, client_certs: bool) -> grpc.ServerCredentials:
    d = Path(cert_dir)
    pair = (_read(d / "server.key", "net.cert_dir"), _read(d / "server.pem", "net.cert_dir"))
    if client_certs:  # mutual TLS: only certificates signed by our CA get a connection
        return grpc.ssl_server_credentials([pair], root_certificates=_read(d / "ca.pem", "net.cert_dir"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def client_credentials(cert_dir: str | Path, client_id: int) -> grpc.ChannelCredentials:
    """TLS to the server, checked against our CA; with a client certificate when the directory holds one."""
    d = Path(cert_dir)
    ca = _read(d / "ca.pem", "--certs")
    cert, key = d / "clients" / f"client-{client_id}.pem", d / "clients" / f"client-{client_id}-tls.key"
    if cert.is_file() and key.is_file():
        return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    return grpc.ssl_channel_credentials(ca)
