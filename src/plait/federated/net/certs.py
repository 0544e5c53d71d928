"""`plait fl certs DIR`: a private CA, a server certificate, client certificates and HMAC keys for a test
deployment. Production deployments should use their own PKI; the file layout is what the server and client read.

    DIR/ca.pem                       CA certificate (give to every client)
    DIR/ca.key                       CA private key (keep offline)
    DIR/server.pem, DIR/server.key   server certificate (SANs: the --host names) and key
    DIR/server.secret                HMAC master secret (server only)
    DIR/clients/client-<id>.key      client <id>'s HMAC key (hex)
    DIR/clients/client-<id>.pem      client <id>'s certificate (CN client-<id>), for mutual TLS
    DIR/clients/client-<id>-tls.key  its private key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plait.federated.net.auth import derive_client_key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "plait test deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(subject: str, public_key, ca_key, ca_name: x509.Name, days: int, *, is_ca: bool = False,
           hosts: tuple[str, ...] = (), usage=None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_certs(out_dir: str | Path, num_clients: int, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
               days: int = 30) -> Path:
    """Write a CA, a server certificate for `hosts`, and keys plus certificates for clients 0..num_clients-1."""
    if num_clients < 0:
        raise ValueError(f"--clients must be >= 0, got {num_clients}")
    if not hosts:
        raise ValueError("--host: the server certificate needs at least one host name or address")
    out = Path(out_dir)
    if (out / "ca.key").exists():
        raise FileExistsError(f"{out} already holds a CA (ca.key); choose another directory")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("plait test CA")
    ca_cert = _issue("plait test CA", ca_key.public_key(), ca_key, ca_name, days, is_ca=True)
    _write(out / "ca.pem", ca_cert.public_bytes(pem))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(hosts[0], server_key.public_key(), ca_key, ca_name, days, hosts=hosts,
                         usage=ExtendedKeyUsageOID.SERVER_AUTH)
    _write(out / "server.pem", server_cert.public_bytes(pem))
    _write(out / "server.key", _key_pem(server_key), private=True)
    master = secrets.token_bytes(32)
    _write(out / "server.secret", master.hex().encode() + b"\n", private=True)
    for cid in range(num_clients):
        add_client(out, cid, ca_key=ca_key, ca_cert=ca_cert, master=master, days=days)
    return out


def add_client(out: Path, client_id: int, *, ca_key, ca_cert: x509.Certificate, master: bytes, days: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(f"client-{client_id}", key.public_key(), ca_key, ca_cert.subject, days,
                  usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    clients = out / "clients"
    _write(clients / f"client-{client_id}.key", derive_client_key(master, client_id).hex().encode() + b"\n",
           private=True)
    _write(clients / f"client-{client_id}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(clients / f"client-{client_id}-tls.key", _key_pem(key), private=True)
