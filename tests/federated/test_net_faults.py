"""Faults with real processes on 127.0.0.1: a client killed mid-round is dropped once its heartbeat stops and the
round completes on its quorum; a server killed with SIGKILL resumes at its last finished round, the clients
reconnect by themselves, and the run ends with the same model as an uninterrupted simulation."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.local import (
    cluster,
    fetch_status,
    read_records,
    small_config,
    start_client,
    start_server,
    stop,
    wait_for_server,
    wait_until,
    write_config,
)
from plait.federated.simulation import build_server
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict


@pytest.mark.timeout(150)
def test_client_killed_mid_round_is_dropped_and_round_completes(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=2, wait_timeout_s=4.0, heartbeat_timeout_s=2.0)
    raw["fl"]["fraction"] = 1.0
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    def slow_client_2(cid):
        return {"extra": ["--slow-s", "60"] if cid == 2 else []}
    with cluster(path, tmp_path, run_dir, 3, slow_client_2) as (server, info, clients):

        def others_reported():  # client 2 holds its task, trained, and now sits in its 60 s "slow device" sleep
            current = fetch_status("127.0.0.1", info["status_port"]).get("current", {})
            return current.get("round") == 1 and sorted(current.get("finished", [])) == [0, 1]

        wait_until(others_reported, timeout=90, interval=0.1, what="clients 0 and 1 reporting round 1")
        killed_at = time.monotonic()
        os.kill(clients[2].pid, signal.SIGKILL)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()
        finished_in = time.monotonic() - killed_at
        codes = [clients[cid].wait(timeout=30) for cid in (0, 1)]
    records = read_records(run_dir)
    assert codes == [0, 0]
    assert [r["participants"] for r in records] == [2, 2]
    assert records[0]["selected"] == 3 and records[0]["dropped"] == 1 and records[0]["lost"] == 1
    assert records[1]["connected"] == 2 and records[1]["selected"] == 2  # the dead client is not selected again
    assert finished_in < 30  # dropped by heartbeat (2 s), long before the 60 s round deadline
    assert "client 2 lost" in (tmp_path / "server.log").read_text()


@pytest.mark.slow  # two server start-ups and four rounds: ~15 s of CPU, run with the slow set
@pytest.mark.timeout(200)
def test_server_sigkill_then_resume_continues_at_last_finished_round(tmp_path):
    rounds = 4
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=rounds)
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    server = start_server(path, tmp_path / "server.log")
    clients, resumed = [], None
    try:
        info = wait_for_server(run_dir, server)
        address = f"127.0.0.1:{info['port']}"
        # Slow pushes (0.7 s) keep each round long enough to kill the server between rounds 2 and 4.
        clients = [start_client(path, address, cid, tmp_path / f"client{cid}.log", extra=["--slow-s", "0.7"])
                   for cid in range(3)]
        wait_until(lambda: load_checkpoint(run_dir / "checkpoint.pt")["round"] >= 2
                   if (run_dir / "checkpoint.pt").exists() else False, timeout=120, interval=0.05,
                   what="round 2 checkpointed")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        killed_after = load_checkpoint(run_dir / "checkpoint.pt")["round"]
        assert killed_after < rounds, "the run finished before the kill; slow the clients down"
        started = time.time()
        resumed = start_server(path, tmp_path / "server2.log", resume=True, overrides=[f"net.port={info['port']}"])
        wait_for_server(run_dir, resumed, after=started - 1)
        assert resumed.wait(timeout=150) == 0, (tmp_path / "server2.log").read_text()
        codes = [c.wait(timeout=30) for c in clients]
    finally:
        for process in [server, *clients] + ([resumed] if resumed else []):
            stop(process)
    assert codes == [0, 0, 0], [(tmp_path / f"client{c}.log").read_text()[-1500:] for c in range(3)]
    records = read_records(run_dir)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))  # none lost, none repeated
    # elapsed_s is the run's training time: it goes on across the resume instead of restarting at zero
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[killed_after] > elapsed[killed_after - 1], elapsed
    assert "re-registered" not in (tmp_path / "server2.log").read_text()  # a fresh server: clients registered anew
    assert all(f"client {c}: " in (tmp_path / f"client{c}.log").read_text() for c in range(3))
    # Same model as the uninterrupted simulation: resumed randomness comes from (seed, round, client).
    sim = build_server(from_dict(NetworkRunConfig, raw).simulation())
    state = sim.initial_state()
    while state.round < rounds:
        state, _ = sim.run_round(state)
    torch.testing.assert_close(load_checkpoint(run_dir / "checkpoint.pt")["params"], state.params,
                               rtol=1e-5, atol=1e-6)
    assert killed_after >= 2
