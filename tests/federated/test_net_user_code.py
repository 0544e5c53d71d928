"""A user's own model (BatchNorm, dropout) over real gRPC: three client processes each read only their own folder
(`--data-path`), the server's config names no client's data at all (only its own test set), and the run ends with
the weights of the simulation of the same clients."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from plait.federated.config import FederatedRunConfig
from plait.federated.net.local import cluster, read_records, small_config, write_config
from plait.federated.simulation import build_server
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model"
NUM_CLIENTS, ROUNDS = 3, 2


@pytest.mark.timeout(150)
def test_clients_train_a_user_model_on_their_own_folders(tmp_path):
    # Prepare: each client's own folder, and the server's own test set
    sys.path.insert(0, str(EXAMPLE))
    try:
        from write_client_folders import write
    finally:
        sys.path.remove(str(EXAMPLE))
    write(tmp_path / "clients", NUM_CLIENTS)
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=ROUNDS)
    raw["model"] = {"factory": f"{EXAMPLE / 'shapes.py'}:make_net"}
    raw["data"] = {"test_path": str(tmp_path / "clients" / "test.npz"), "num_clients": NUM_CLIENTS}
    raw["fl"].update(fraction=1.0, eval_every=1, plan={"batch_size": 16, "lr": 0.05, "max_steps": 5})
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"

    def own_folder(cid):
        return {"extra": ["--data-path", str(tmp_path / "clients" / f"client-{cid}")]}

    # Execute
    with cluster(path, tmp_path, run_dir, NUM_CLIENTS, own_folder) as (server, _, clients):
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        codes = [c.wait(timeout=30) for c in clients]
    # Assert: the simulation of the same clients' files gives the same model
    assert codes == [0] * NUM_CLIENTS, [(tmp_path / f"client{c}.log").read_text()[-2000:] for c in range(3)]
    folder = tmp_path / "as_client_files"
    folder.mkdir()
    for cid in range(NUM_CLIENTS):
        shutil.copy(tmp_path / "clients" / f"client-{cid}" / "data.npz", folder / f"client-{cid}.npz")
    shutil.copy(tmp_path / "clients" / "test.npz", folder / "test.npz")
    sim_raw = {k: v for k, v in raw.items() if k != "net"}
    sim_raw["data"] = {"source": str(folder), "num_clients": NUM_CLIENTS, "partition": "natural"}
    sim = build_server(from_dict(FederatedRunConfig, sim_raw))
    state = sim.initial_state()
    records = []
    while state.round < ROUNDS:
        state, record = sim.run_round(state)
        records.append(record)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    torch.testing.assert_close(ckpt["params"], state.params, rtol=1e-5, atol=1e-6)
    net_records = read_records(run_dir)
    assert [r["participants"] for r in net_records] == [NUM_CLIENTS] * ROUNDS
    assert net_records[-1]["test_accuracy"] == pytest.approx(records[-1]["test_accuracy"], abs=1e-6)
    assert (run_dir / "model.safetensors").exists()


def test_a_server_whose_model_does_not_fit_writes_no_settings(tmp_path):
    from plait.experiment.runs.fl_server import run_server
    from plait.federated.net.config import NetworkRunConfig

    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=ROUNDS)
    raw["model"] = {"factory": f"{EXAMPLE / 'regression.py'}:make_mlp"}  # takes 4 features, not images
    with pytest.raises(ValueError, match="the model does not take the data's inputs"):
        run_server(from_dict(NetworkRunConfig, raw))
    assert not (tmp_path / "runs" / "net" / "config.toml").exists()  # what `--resume` would read is not a lie
