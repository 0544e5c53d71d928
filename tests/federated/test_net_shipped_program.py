"""The training program travels over real gRPC (net.ship_program): clients started without the model's source (no
[model] in their config, the code only in the server's folder) train the program the server ships, beside a client
that imports the code, and the run ends with the weights of the simulation of the same clients. A program whose
bytes do not hash to what the server announced is refused unread, and so is a plan for a model a client cannot
build."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.federated.config import FederatedRunConfig
from plait.federated.net.client import EXIT_REFUSED, ClientOptions, NetClient
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.connection import Task
from plait.federated.net.local import cluster, read_records, small_config, write_config
from plait.federated.net.serve import _start_grpc
from plait.federated.net.server import NetServer
from plait.federated.plan import TrainingPlan
from plait.federated.shipping.trace import export_program
from plait.federated.simulation import build_server
from plait.federated.task import Task as ClassificationTask
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict
from plait.user_code import resolve
from tests_support import EXAMPLE

NUM_CLIENTS, ROUNDS = 3, 2
IMPORTS_THE_CODE = 2  # the one client whose config names the model


def write_folders(root: Path) -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from write_client_folders import write
    finally:
        sys.path.remove(str(EXAMPLE))
    write(root, NUM_CLIENTS)


def server_config(tmp_path: Path, model_file: Path) -> dict:
    """The server's config: the model's code in `model_file`, and net.ship_program on."""
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=ROUNDS, ship_program=True)
    raw["model"] = {"factory": f"{model_file}:make_net"}
    raw["data"] = {"test_path": str(tmp_path / "clients" / "test.npz"), "num_clients": NUM_CLIENTS}
    raw["fl"].update(fraction=1.0, eval_every=1, plan={"batch_size": 16, "lr": 0.05, "max_steps": 5})
    return raw


def without_source(raw: dict) -> dict:
    """A client's config that names no model: it trains whatever program the server ships."""
    return {key: value for key, value in raw.items() if key != "model"}


@pytest.mark.timeout(180)
def test_clients_without_the_source_train_the_shipped_program_as_the_code_would(tmp_path):
    # Prepare: each client's own folder; two clients' config names no model, one client imports the code
    write_folders(tmp_path / "clients")
    (tmp_path / "server_code").mkdir()  # the model's code, where only the server looks
    raw = server_config(tmp_path, Path(shutil.copy(EXAMPLE / "shapes.py", tmp_path / "server_code" / "shapes.py")))
    path = write_config(tmp_path / "fl.toml", raw)
    sourceless = write_config(tmp_path / "client.toml", without_source(raw))
    importing = write_config(tmp_path / "client_imports.toml", raw | {"net": raw["net"] | {"ship_program": False}})
    run_dir = tmp_path / "runs" / "net"

    def client_args(cid):
        return {"extra": ["--data-path", str(tmp_path / "clients" / f"client-{cid}"), "--data",
                          str(importing if cid == IMPORTS_THE_CODE else sourceless)]}

    # Execute
    with cluster(path, tmp_path, run_dir, NUM_CLIENTS, client_args) as (server, _, clients):
        assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-3000:]
        codes = [c.wait(timeout=30) for c in clients]
    logs = [(tmp_path / f"client{cid}.log").read_text() for cid in range(NUM_CLIENTS)]
    assert codes == [0] * NUM_CLIENTS, [log[-2000:] for log in logs]
    # Assert: who trained what, each program fetched once, counted in the first round's traffic
    for cid, log in enumerate(logs):
        assert ("training the server's program" in log) == (cid != IMPORTS_THE_CODE), log[-2000:]
    assert (tmp_path / "server.log").read_text().count("sent the training program") == NUM_CLIENTS - 1
    records = read_records(run_dir)
    assert [r["participants"] for r in records] == [NUM_CLIENTS] * ROUNDS
    assert records[0]["bytes_down"] > records[1]["bytes_down"]
    # ... and the simulation of the same clients' files, with the model's code, gives the same model
    folder = tmp_path / "as_client_files"
    folder.mkdir()
    for cid in range(NUM_CLIENTS):
        shutil.copy(tmp_path / "clients" / f"client-{cid}" / "data.npz", folder / f"client-{cid}.npz")
    shutil.copy(tmp_path / "clients" / "test.npz", folder / "test.npz")
    sim_raw = {k: v for k, v in raw.items() if k != "net"}
    sim_raw["data"] = {"source": str(folder), "num_clients": NUM_CLIENTS, "partition": "natural"}
    sim_raw["model"] = {"factory": f"{EXAMPLE / 'shapes.py'}:make_net"}  # the same code (this process has it)
    sim = build_server(from_dict(FederatedRunConfig, sim_raw))
    state = sim.initial_state()
    while state.round < ROUNDS:
        state, record = sim.run_round(state)
    torch.testing.assert_close(load_checkpoint(run_dir / "checkpoint.pt")["params"], state.params,
                               rtol=1e-5, atol=1e-5)
    assert records[-1]["test_accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)


@contextmanager
def serving(server: NetServer) -> Iterator[str]:
    """`server`'s gRPC service on 127.0.0.1 in a thread of its own (no rounds: registration and downloads)."""
    loop = asyncio.new_event_loop()
    started, holder = threading.Event(), {}

    async def main():
        service, holder["stop"] = await _start_grpc(server), asyncio.Event()
        started.set()
        await holder["stop"].wait()
        await service.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the gRPC service did not start"
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


def in_process_client(raw: dict, address: str, tmp_path: Path, cid: int = 0) -> NetClient:
    opts = ClientOptions(server=address, client_id=cid, data_path=str(tmp_path / "clients" / f"client-{cid}"),
                         max_retry_s=5)
    return NetClient(from_dict(NetworkRunConfig, raw), opts)


@pytest.mark.timeout(120)
def test_a_tampered_program_and_a_model_a_client_cannot_build_are_refused(tmp_path, caplog):
    # Prepare: the server announces the hash of its program but sends other bytes (one weight changed)
    write_folders(tmp_path / "clients")
    raw = server_config(tmp_path, EXAMPLE / "shapes.py")
    config = from_dict(NetworkRunConfig, raw)
    torch.manual_seed(0)
    model = resolve(config.model.factory, "model.factory")()
    with np.load(tmp_path / "clients" / "test.npz") as arrays:
        test = torch.from_numpy(arrays["x"][:8]), torch.from_numpy(arrays["y"][:8])
    program = export_program(model, ClassificationTask(), *test, config.model.label)
    numel = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())
    server = NetServer(config, numel, program=program)
    tampered = bytearray(program)
    tampered[-5] ^= 0xFF
    caplog.set_level(logging.ERROR, logger="plait.fl.client")
    with serving(server) as address:
        # Execute / Assert: the honest bytes are taken; tampered ones refused with the hashes named
        honest = in_process_client(without_source(raw), address, tmp_path)
        honest._register()
        assert honest.trainee is not None and honest.trainee.program_sha256 == server.shipped_sha256
        task = Task(1, "t", TrainingPlan(), honest.trainee.weights, program_sha256="0" * 64)
        with pytest.raises(ValueError, match="the plan trains program '0000000000000000', this client holds"):
            honest._train_and_push(task)  # a plan naming another program is not trained
        honest.conn.close()

        server.shipped = bytes(tampered)
        assert in_process_client(without_source(raw), address, tmp_path).run() == EXIT_REFUSED
        assert "the program's bytes hash to sha256" in caplog.text and "refused, none of it was read" in caplog.text

        # a client that imports the code but builds another model than the server's: refused, with the way out
        caplog.clear()
        other = raw | {"net": raw["net"] | {"ship_program": False}}
        other["model"] = raw["model"] | {"options": {"channels": 4}}
        assert in_process_client(other, address, tmp_path).run() == EXIT_REFUSED
        assert "or set net.ship_program = true to train the program it ships" in caplog.text
