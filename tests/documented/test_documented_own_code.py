"""The documented ways in for a user's own code beyond the simulator: the cluster scripts of examples/cluster/
(their own loop under torchrun, and on the parameter servers' KVStore), and the model shipped as a program to
clients that lack its source (examples/custom_model/fl_shipped.toml), each command as written in a copy of
examples/.

What the test adds: torchrun's rendezvous port through its environment (PET_MASTER_PORT, a free port); the network
run gets the additions of test_documented_networks.py (one round, free ports)."""

from __future__ import annotations

import re

import pytest
from as_a_user import accuracy, environment, fill, free_port, records, run, user_folder
from docs_commands import documented
from test_documented_networks import _serve_one_round

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script,commands", [
    ("data_parallel_own_loop", [documented("torchrun --nproc-per-node 2 examples/cluster/data_parallel_own_loop.py"),
                                documented("torchrun --nproc-per-node 2 examples/cluster/data_parallel_own_loop.py "
                                           "--allreduce tree --compression fp16")]),
    ("pipeline_own_model", [documented("torchrun --nproc-per-node 2 examples/cluster/pipeline_own_model.py"),
                            documented("torchrun --nproc-per-node 2 examples/cluster/pipeline_own_model.py "
                                       "--schedule gpipe --split 4")]),
])
def test_your_own_loop_under_torchrun(tmp_path, script, commands):
    folder = user_folder(tmp_path)
    for command in commands:
        output = run(command, folder, env=environment(PET_MASTER_PORT=str(free_port())))
        losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", output)]
        assert len(losses) >= 2 and losses[-1] < losses[0], output[-2000:]  # it trained
        assert float(re.findall(r"accuracy (\d\.\d+)", output)[-1]) > 0.8, output[-2000:]  # two spirals: 0.5 by chance


@pytest.mark.timeout(300)
def test_your_own_loop_on_the_kvstore(tmp_path):
    folder = user_folder(tmp_path)
    output = run(documented("python examples/cluster/kvstore_own_loop.py --servers 2 --workers 2 --steps 300"), folder)
    falls = re.findall(r"worker (\d): loss (\d+\.\d+) -> (\d+\.\d+)", output)
    assert sorted(w for w, _, _ in falls) == ["0", "1"], output[-2000:]
    assert all(float(end) < 0.7 * float(start) for _, start, end in falls), falls


@pytest.mark.timeout(300)
def test_your_model_shipped_to_clients_without_its_source(tmp_path):
    folder = user_folder(tmp_path)
    run(documented("python examples/custom_model/write_client_folders.py clients 3"), folder)
    client_k = documented("plait fl client --server 127.0.0.1:50051 --data "
                          "examples/custom_model/client_without_model.toml --id K --data-path clients/client-K")

    run_dir = _serve_one_round(folder, documented("plait fl server examples/custom_model/fl_shipped.toml"),
                               [fill(client_k, K=str(cid)) for cid in range(3)], "shapes-shipped")

    last = records(run_dir)[-1]
    assert last["round"] == 1 and last["participants"] == 3 and 0 < accuracy(last) <= 1
