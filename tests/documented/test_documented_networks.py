"""The documented network runs: a `plait fl server` and its `plait fl client`s started together as real processes
on 127.0.0.1, each command as written in a copy of examples/, for one round.

What the test adds: `--set fl.rounds=1` and, so that runs beside each other never clash, `--set net.port=0
--set net.status_port=0` on the server (a free port each, which the server writes to server.json); the clients
then dial that port instead of the documented 50051."""

from __future__ import annotations

import json

import pytest
from as_a_user import accuracy, fill, finish, records, run, server_address, start, stop, tail, user_folder
from docs_commands import documented

pytestmark = pytest.mark.slow
SERVER_EXTRA = ["--set", "fl.rounds=1", "--set", "net.port=0", "--set", "net.status_port=0"]
DOCUMENTED_ADDRESS = "127.0.0.1:50051"


def _serve_one_round(folder, server_command: str, client_commands: list[str], run_name: str):
    """Start the server, then its clients on the port it got; wait for all; return the run directory."""
    run_dir = folder / "runs" / run_name
    server_log = folder / "server.log"
    server = start(server_command, folder, server_log, SERVER_EXTRA)
    clients = []
    try:
        address = server_address(run_dir, server, server_log)
        for cid, command in enumerate(client_commands):
            assert DOCUMENTED_ADDRESS in command
            clients.append(start(command.replace(DOCUMENTED_ADDRESS, address), folder, folder / f"client{cid}.log"))
        server_code, *client_codes = finish([server, *clients], timeout=240)
    finally:
        stop([server, *clients])
    assert server_code == 0, tail(server_log)
    assert client_codes == [0] * len(clients), [(c, tail(folder / f"client{c}.log", 800)) for c in range(len(clients))]
    return run_dir


@pytest.mark.timeout(420)
def test_fl_network_example_one_machine(tmp_path):
    """examples/fl_network.toml: certificates, the server, and clients 0 to 9 (TLS and HMAC, as configured)."""
    folder = user_folder(tmp_path)
    run(documented("plait fl certs certs --clients 10 --host localhost --host 127.0.0.1"), folder)
    client_0 = documented("plait fl client --server 127.0.0.1:50051 --data examples/fl_network.toml --id 0 "
                          "--certs certs")  # "... --id 9": the same command for each client id

    run_dir = _serve_one_round(folder, documented("plait fl server examples/fl_network.toml"),
                               [client_0.replace("--id 0", f"--id {cid}") for cid in range(10)], "fl_network")

    last = records(run_dir)[-1]
    assert last["round"] == 1 and last["participants"] >= 3 and 0 < accuracy(last) <= 1
    assert (run_dir / "model.safetensors").exists() and list((run_dir / "plots").glob("*.png"))
    assert json.loads((run_dir / "server.json").read_text())["tls"] is True  # as the config asks (tls = "on")


@pytest.mark.timeout(300)
def test_custom_model_over_the_network(tmp_path):
    """examples/custom_model/fl_network.toml: each client's own folder, the server, clients K = 0, 1, 2."""
    folder = user_folder(tmp_path)
    run(documented("python examples/custom_model/write_client_folders.py clients 3"), folder)
    client_k = documented("plait fl client --server 127.0.0.1:50051 --data examples/custom_model/fl_network.toml "
                          "--id K --data-path clients/client-K")

    run_dir = _serve_one_round(folder, documented("plait fl server examples/custom_model/fl_network.toml"),
                               [fill(client_k, K=str(cid)) for cid in range(3)], "shapes-net")

    last = records(run_dir)[-1]
    assert last["round"] == 1 and last["participants"] == 3 and 0 < accuracy(last) <= 1
    assert sorted(p.name for p in (folder / "clients").iterdir()) == ["client-0", "client-1", "client-2", "test.npz"]


def test_certificates_for_a_server_on_another_machine(tmp_path):
    """README, "Federated learning across two machines": the one step that runs on a single machine."""
    output = run(documented("plait fl certs certs --clients 100 --host fl.example.org"), tmp_path)

    certs = tmp_path / "certs"
    assert "100 client credentials" in output and (certs / "ca.pem").exists() and (certs / "server.pem").exists()
    assert len({p.name.split(".")[0].removesuffix("-tls") for p in (certs / "clients").iterdir()}) == 100
    from cryptography import x509

    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
