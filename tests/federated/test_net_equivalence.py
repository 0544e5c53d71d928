"""One real server process and 5 real client processes on 127.0.0.1, mutual TLS and per-client keys on, finish 3
rounds with the same global model as the in-process simulator on the same config and seed."""

from __future__ import annotations

import pytest
import torch

from plait.federated.net.certs import make_certs
from plait.federated.net.local import run_against_simulation, small_config

NUM_CLIENTS, ROUNDS = 5, 3


@pytest.mark.timeout(120)
def test_five_clients_three_rounds_match_simulation(tmp_path):
    # Prepare: certificates, one config file for the server and every client.
    certs = make_certs(tmp_path / "certs", NUM_CLIENTS)
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=ROUNDS, tls="on", auth="hmac",
                       client_certs=True, cert_dir=str(certs))
    # Execute: the networked run, and the reference simulation meanwhile in this process.
    run = run_against_simulation(raw, tmp_path, NUM_CLIENTS, lambda cid: {"certs": certs, "tls": True})
    # Assert: TLS on, every process finished cleanly, every round had the simulator's participants, same weights.
    assert run.server_code == 0, run.log("server.log")
    assert run.info["tls"] is True
    assert run.client_codes == [0] * NUM_CLIENTS, [run.log(f"client{c}.log") for c in range(NUM_CLIENTS)]
    records, ref_records = run.records, run.ref_records
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["participants"] for r in records] == [r["participants"] for r in ref_records] == [3, 3, 3]
    assert run.checkpoint["round"] == ROUNDS
    torch.testing.assert_close(run.checkpoint["params"], run.reference.params, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run.checkpoint["params"], run.initial, atol=1e-4)  # training moved the model
    assert records[-1]["test_accuracy"] == pytest.approx(ref_records[-1]["test_accuracy"], abs=2e-4)
