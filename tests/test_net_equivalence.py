"""One real server process and 5 real client processes on 127.0.0.1, mutual TLS and per-client keys on, finish 3
rounds with the same global model as the in-process simulator on the same config and seed."""

from __future__ import annotations

import pytest
import torch

from plait.experiment.checkpoint import load_checkpoint
from plait.experiment.config import from_dict
from plait.federated.net.certs import make_certs
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.local import cluster, read_records, simulate, small_config, write_config

NUM_CLIENTS, ROUNDS = 5, 3


@pytest.mark.timeout(120)
def test_five_clients_three_rounds_match_simulation(tmp_path):
    # Prepare: certificates, one config file for the server and every client.
    certs = make_certs(tmp_path / "certs", NUM_CLIENTS)
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=ROUNDS, tls="on", auth="hmac",
                       client_certs=True, cert_dir=str(certs))
    path = write_config(tmp_path / "fl.toml", raw)
    with cluster(path, tmp_path, tmp_path / "runs" / "net", NUM_CLIENTS,
                 lambda cid: {"certs": certs, "tls": True}) as (server, info, clients):
        assert info["tls"] is True
        # Execute: the reference simulation runs meanwhile, in this process.
        reference, ref_records, initial = simulate(from_dict(NetworkRunConfig, raw))
        assert server.wait(timeout=100) == 0, (tmp_path / "server.log").read_text()
        codes = [c.wait(timeout=30) for c in clients]
    # Assert: every client finished cleanly, every round had the simulator's participants, same final weights.
    assert codes == [0] * NUM_CLIENTS, [(tmp_path / f"client{c}.log").read_text()[-2000:] for c in range(NUM_CLIENTS)]
    records = read_records(tmp_path / "runs" / "net")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["participants"] for r in records] == [r["participants"] for r in ref_records] == [3, 3, 3]
    ckpt = load_checkpoint(tmp_path / "runs" / "net" / "checkpoint.pt")
    assert ckpt["round"] == ROUNDS
    torch.testing.assert_close(ckpt["params"], reference.params, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ckpt["params"], initial, atol=1e-4)  # training moved the model
    assert records[-1]["accuracy"] == pytest.approx(ref_records[-1]["accuracy"], abs=2e-4)
