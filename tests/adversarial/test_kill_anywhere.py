"""kill -9 of the FL server at random moments of a run (inside a round's collection, between rounds, during a
checkpoint write), resumed each time with `--resume`: the run ends with the weights of the uninterrupted simulation,
because every round's randomness comes from (seed, round, client) and its aggregate does not depend on the order in
which updates arrive (issue 14)."""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch

from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.local import (
    read_records,
    small_config,
    start_client,
    start_server,
    stop,
    wait_for_server,
    write_config,
)
from plait.federated.simulation import build_server
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict

ROUNDS, CLIENTS, KILLS = 6, 3, 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_killed_at_random_moments_ends_as_the_uninterrupted_run(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=CLIENTS, rounds=ROUNDS)
    raw["fl"]["fraction"] = 1.0
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    rng = random.Random(1234)  # the kill moments, reproducible
    server = start_server(path, tmp_path / "server0.log")
    clients = []
    try:
        info = wait_for_server(run_dir, server)
        address = f"127.0.0.1:{info['port']}"
        clients = [start_client(path, address, cid, tmp_path / f"client{cid}.log", extra=["--slow-s", "0.3"])
                   for cid in range(CLIENTS)]
        for kill in range(1, KILLS + 1):
            time.sleep(rng.uniform(0.5, 3.0))  # anywhere: collecting, aggregating, writing the checkpoint
            if server.poll() is not None:
                break
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            started = time.time()
            server = start_server(path, tmp_path / f"server{kill}.log", resume=(run_dir / "checkpoint.pt").exists(),
                                  overrides=[f"net.port={info['port']}"])
            wait_for_server(run_dir, server, after=started - 1)
        assert server.wait(timeout=300) == 0, (tmp_path / f"server{kill}.log").read_text()[-3000:]
        codes = [c.wait(timeout=60) for c in clients]
    finally:
        for process in [server, *clients]:
            stop(process)
    assert codes == [0] * CLIENTS
    assert [r["round"] for r in read_records(run_dir)] == list(range(1, ROUNDS + 1))  # none lost, none repeated
    sim = build_server(from_dict(NetworkRunConfig, raw).simulation())
    state = sim.initial_state()
    while state.round < ROUNDS:
        state, _ = sim.run_round(state)
    torch.testing.assert_close(load_checkpoint(run_dir / "checkpoint.pt")["params"], state.params, rtol=0, atol=1e-7)
