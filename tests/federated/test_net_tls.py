"""The client takes TLS from its config (net.tls) unless the command line says otherwise, as the server does, and a
TLS mismatch is named as such in the client's error (before: the client ignored net.tls = "on" on a loopback
address, looped on UNAVAILABLE "Socket closed" and gave up with "server unreachable")."""

from __future__ import annotations

import pytest

from plait.federated.net.certs import make_certs
from plait.federated.net.local import cluster, small_config, start_client, stop, write_config


@pytest.mark.timeout(120)
def test_clients_follow_net_tls_from_their_config_and_a_mismatch_is_named(tmp_path):
    certs = make_certs(tmp_path / "certs", 3)
    raw = small_config(tmp_path / "runs", num_clients=2, rounds=1, tls="on", auth="hmac", cert_dir=str(certs))
    path = write_config(tmp_path / "fl.toml", raw)
    # The server waits for its two clients (net.wait_for_clients), so it is still there when the client with TLS
    # off gives up; only then do the right clients start, with --certs only: TLS comes from the config's
    # net.tls = "on", as for the server.
    with cluster(path, tmp_path, tmp_path / "runs" / "net", 0) as (server, info, _):
        address = f"127.0.0.1:{info['port']}"
        wrong = start_client(path, address, 1, tmp_path / "wrong.log", certs=certs, tls=False,
                             extra=["--max-retry-s", "3"])
        try:
            assert wrong.wait(timeout=60) == 1  # gave up
        finally:
            stop(wrong)
        clients = [start_client(path, address, cid, tmp_path / f"client{cid}.log", certs=certs) for cid in (0, 1)]
        try:
            assert server.wait(timeout=90) == 0, (tmp_path / "server.log").read_text()[-2000:]
            assert [c.wait(timeout=30) for c in clients] == [0, 0]
        finally:
            for client in clients:
                stop(client)
    log = (tmp_path / "wrong.log").read_text()
    assert "this client connects with TLS off; a server with TLS on closes such connections" in log, log[-2000:]
