"""`plait train CONFIG` under torchrun: rank 0 coordinates, rank 1 supervises the server, ranks 2 and 3 a worker
each; the run ends where single-process SGD does (BSP), also when the server process is killed mid-run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_ps_cluster import single_process_sgd

from plait.ps.checkpoint import load_shards
from plait.ps.config import PSRunConfig
from plait.ps.torchrun_roles import ADVERTISE_ENV, advertised_endpoint, torchrun_workers
from plait.ps.trainer import PARAMS_KEY
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import from_dict, load_toml

CONFIG = """
[run]
name = "{name}"
root = "{root}"
[data]
test_examples = 200
[train]
steps = {steps}
batch_size = 16
eval_every_s = 0.2
[optimizer]
name = "sgd"
lr = 0.1
[sync]
kind = "ps"
servers = 1
piece_numel = 0        # one piece: the checkpoint holds the whole model
retry_s = 0.3
[straggler]
step_s = {step_s}
"""


def write_config(tmp_path: Path, name: str, steps: int, step_s: float = 0.0, sync: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, root=tmp_path, steps=steps, step_s=step_s).replace(
        "[straggler]", f"{sync}\n[straggler]"))
    return path


def start_torchrun(config_path: Path, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "--max-restarts",
           str(max_restarts), "-m", "plait.cli", "train", str(config_path)]
    return subprocess.Popen(cmd, cwd=config_path.parent, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout_s: float = 180) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return output


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


def final_weights(run_dir: Path) -> np.ndarray:
    return load_shards(run_dir / "servers" / "server-0.npz").shards[PARAMS_KEY, 0].param


def load(config_path: Path) -> PSRunConfig:
    return from_dict(PSRunConfig, load_toml(config_path))


def test_the_ranks_take_their_roles_and_end_as_single_process_sgd(tmp_path):
    config_path = write_config(tmp_path, "tr", steps=8)
    proc = start_torchrun(config_path)
    output = finish(proc)
    assert proc.returncode == 0, output
    run_dir = tmp_path / "tr"
    assert "bsp with 1 server(s), 2 worker(s)" in output
    np.testing.assert_allclose(final_weights(run_dir), single_process_sgd(load(config_path), 2), rtol=0, atol=2e-6)
    for rank in range(2):
        assert [r["step"] for r in read_metrics(run_dir / f"worker-{rank}.jsonl")] == list(range(8))
    assert [r for r in read_metrics(run_dir / "metrics.jsonl") if "test_loss" in r][-1]["step"] == 8
    server_events = [e["event"] for e in read_metrics(run_dir / "servers" / "server-0.jsonl")]
    assert server_events[-2:] == ["checkpoint", "stopped"]  # SHUTDOWN from the coordinator: a final checkpoint


@pytest.mark.slow
def test_under_curve_keys_every_role_presents_its_key_and_the_run_is_the_same(tmp_path):
    """The coordinator creates the pieces and says SHUTDOWN with the launcher's key, the workers push as their own
    ids (worker-<r> keys, issued by rank 0), the evaluator reads with the client key: nothing is refused."""
    from plait.ps.security import make_keys

    keys = make_keys(tmp_path / "keys").directory
    config_path = write_config(tmp_path, "curve", steps=8, sync=f'curve_keys = "{keys}"')
    proc = start_torchrun(config_path)
    output = finish(proc)
    assert proc.returncode == 0, output
    np.testing.assert_allclose(final_weights(tmp_path / "curve"), single_process_sgd(load(config_path), 2), rtol=0,
                               atol=2e-6)
    events = [e["event"] for e in read_metrics(tmp_path / "curve" / "servers" / "server-0.jsonl")]
    assert events[-2:] == ["checkpoint", "stopped"] and "refused" not in events


@pytest.mark.slow
def test_a_killed_server_process_is_restarted_by_its_rank_and_the_run_still_ends_as_sgd(tmp_path):
    config_path = write_config(tmp_path, "kill", steps=40, step_s=0.05)
    run_dir = tmp_path / "kill"
    proc = start_torchrun(config_path)
    try:
        wait_for(lambda: len(read_metrics(run_dir / "worker-0.jsonl")) >= 5, 120, "worker steps")
        os.kill(int((run_dir / "servers" / "server-0.pid").read_text()), signal.SIGKILL)  # the process, not the rank
    finally:
        output = finish(proc)
    assert proc.returncode == 0, output
    assert "server restarts: 1" in output
    assert [e["event"] for e in read_metrics(run_dir / "logs" / "rank-1.jsonl")].count("server_restarted") == 1
    assert [e for e in read_metrics(run_dir / "metrics.jsonl") if e.get("event") == "server_restarted"]
    np.testing.assert_allclose(final_weights(run_dir), single_process_sgd(load(config_path), 2), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_a_killed_rank_makes_torchrun_restart_the_group_which_resumes_from_the_servers_state(tmp_path):
    """SIGKILL of a worker's rank (its worker dies with it): torchrun stops the others (the server writes a final
    checkpoint) and starts the group again, which goes on from the servers' clocks to single-process SGD's end."""
    config_path = write_config(tmp_path, "again", steps=40, step_s=0.05)
    run_dir = tmp_path / "again"
    proc = start_torchrun(config_path, max_restarts=1)
    try:
        wait_for(lambda: len(read_metrics(run_dir / "worker-1.jsonl")) >= 5, 120, "worker steps")
        os.kill(int((run_dir / "ranks" / "rank3.pid").read_text()), signal.SIGKILL)
    finally:
        output = finish(proc)
    assert proc.returncode == 0, output
    events = [e["event"] for e in read_metrics(run_dir / "servers" / "server-0.jsonl")]
    assert events.count("listening") == 2 and events[-2:] == ["checkpoint", "stopped"]
    # Every step is in the log but, at most, the one in flight at the kill: SIGKILL can land after the servers
    # took its push and before the worker wrote its record, and the group then goes on after it. The weights equal
    # single-process SGD's, so every step's gradient was applied exactly once, recorded or not.
    missing = set(range(40)) - {r["step"] for r in read_metrics(run_dir / "worker-1.jsonl")}
    assert len(missing) <= 1, sorted(missing)
    np.testing.assert_allclose(final_weights(run_dir), single_process_sgd(load(config_path), 2), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_a_signal_to_rank_0_ends_the_run_with_final_checkpoints(tmp_path):
    config_path = write_config(tmp_path, "sig", steps=100_000, step_s=0.02)
    run_dir = tmp_path / "sig"
    proc = start_torchrun(config_path)
    try:
        wait_for(lambda: len(read_metrics(run_dir / "worker-0.jsonl")) >= 3, 120, "worker steps")
        os.kill(int((run_dir / "ranks" / "rank0.pid").read_text()), signal.SIGTERM)
    finally:
        output = finish(proc, timeout_s=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in output, output
    assert [e["event"] for e in read_metrics(run_dir / "servers" / "server-0.jsonl")][-2:] == ["checkpoint", "stopped"]
    assert load_shards(run_dir / "servers" / "server-0.npz").shards[PARAMS_KEY, 0].clocks[0] >= 2


def test_a_world_without_a_worker_or_with_replication_is_refused_naming_the_setting(tmp_path):
    config = load(write_config(tmp_path, "refused", steps=8))
    assert torchrun_workers(config, 4) == 2
    with pytest.raises(ValueError, match="sync.servers = 1"):
        torchrun_workers(config, 2)
    config.sync.replication = 2
    with pytest.raises(ValueError, match="sync.replication = 2"):
        torchrun_workers(config, 6)


def test_the_endpoint_others_dial_names_the_host(monkeypatch):
    monkeypatch.delenv(ADVERTISE_ENV, raising=False)
    assert advertised_endpoint("tcp://10.0.0.5:4321", "10.0.0.5") == "tcp://10.0.0.5:4321"
    assert advertised_endpoint("tcp://0.0.0.0:4321", "0.0.0.0").endswith(":4321")
    assert "0.0.0.0" not in advertised_endpoint("tcp://0.0.0.0:4321", "0.0.0.0")
    monkeypatch.setenv(ADVERTISE_ENV, "node7.cluster")
    assert advertised_endpoint("tcp://0.0.0.0:4321", "*") == "tcp://node7.cluster:4321"


@pytest.mark.slow
def test_two_agents_without_a_shared_directory_over_curve_keys_end_as_sgd(tmp_path):
    """docs/parameter_server.md's two-host form on one machine: two torchrun agents, each in its own folder with its
    own copy of the keys, servers bound to every interface and dialled at the advertised host."""
    import shutil
    import socket

    from plait.ps.security import make_keys

    keys = make_keys(tmp_path / "ps-keys", workers=2).directory
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        shutil.copytree(keys, node / "ps-keys")
        write_config(node, "two", steps=8).rename(node / "cfg.toml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{ADVERTISE_ENV: "127.0.0.1"})
    agents = []
    for number, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "plait-ps", "--rdzv-conf", f"is_host={int(number == 0)}", "-m", "plait.cli", "train",
               "cfg.toml", "--set", "run.root='runs'", "--set", "sync.host='0.0.0.0'",
               "--set", "sync.curve_keys='ps-keys'"]
        agents.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
        time.sleep(1.0)  # the host agent binds the rendezvous port first
    outputs = [finish(agent) for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    runs = [node / "runs" / "two" for node in nodes]
    checkpoints = [r / "servers" / "server-0.npz" for r in runs if (r / "servers" / "server-0.npz").exists()]
    assert len(checkpoints) == 1 and sum((r / "metrics.jsonl").exists() for r in runs) == 1
    reference = single_process_sgd(load(nodes[0] / "cfg.toml"), 2)
    np.testing.assert_allclose(load_shards(checkpoints[0]).shards[PARAMS_KEY, 0].param, reference, rtol=0, atol=2e-6)
