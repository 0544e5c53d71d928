"""`plait fl server` draws the run's plots after its last round, as a simulated run does."""

from __future__ import annotations

import pytest

from plait.federated.net.local import cluster, small_config, write_config


@pytest.mark.timeout(180)
def test_the_network_server_draws_its_plots(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=2, rounds=2)
    raw["fl"].update(fraction=1.0, min_clients=2)
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    with cluster(path, tmp_path, run_dir, 2) as (server, _, clients):
        code = server.wait(timeout=150)
        for client in clients:
            client.wait(timeout=30)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    drawn = {p.name for p in (run_dir / "plots").iterdir()}
    assert {"accuracy.png", "accuracy.svg", "loss.png", "traffic.png", "participation.png",
            "accuracy_vs_mb.png"} <= drawn, drawn
