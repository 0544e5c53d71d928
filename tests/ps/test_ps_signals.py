"""A parameter-server run stopped by a signal: a server (`plait ps server`) and the launcher
(`plait train`) end cleanly on SIGTERM or SIGINT and leave final checkpoints that `--resume` continues from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from plait.experiment.runs.parameter_server import load_run_config, run_ps
from plait.ps import coordinator, launcher
from plait.ps.checkpoint import load_shards
from plait.ps.kvstore import KVStore
from plait.ps.launcher import LocalCluster
from plait.ps.node import node_command
from plait.ps.stop_signals import StopSignals
from plait.runtime.metrics_log import read_metrics


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


def write_config(path: Path, root: Path, name: str, sync: str, steps: int) -> Path:
    path.write_text(f"""
[run]
name = "{name}"
root = "{root}"
[data]
test_examples = 200
[train]
steps = {steps}
batch_size = 16
eval_every_s = 0.2
[sync]
kind = "ps"
checkpoint_every = 0   # only at the end: what the run leaves is the final checkpoint
{sync}
[straggler]
step_s = 0.02
""")
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_server_node_stopped_by_a_signal_writes_its_final_checkpoint(tmp_path, signum):
    config = write_config(tmp_path / "cfg.toml", tmp_path, "node", "", steps=10)
    state = tmp_path / "state"
    server = subprocess.Popen([sys.executable, "-m", "plait.cli", "ps", "server", "--config", str(config),
                               "--index", "0", "--workers", "1", "--state-dir", str(state), "--fresh"])
    try:
        wait_for((state / "server-0.endpoint").exists, 60, "endpoint")
        kv = KVStore([(state / "server-0.endpoint").read_text()], 0, timeout_s=30)
        weights = np.zeros(10, dtype=np.float32)
        kv.init(0, weights)
        for _ in range(3):  # SGD, lr 0.1: each clock adds 0.1
            kv.pushpull(0, -np.ones(10, dtype=np.float32), weights).wait()
        kv.close(goodbye=False)
        server.send_signal(signum)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    snapshot = load_shards(state / "server-0.npz")
    np.testing.assert_allclose(snapshot.shards[0, 0].param, np.full(10, 0.3, np.float32), rtol=1e-6)
    assert snapshot.shards[0, 0].clocks == [2]
    events = [e["event"] for e in read_metrics(state / "server-0.jsonl")]
    assert events[-3:] == ["signalled", "checkpoint", "stopped"]


def start_launcher(config_path, output):
    """`plait train CONFIG`'s parameter-server launcher as its own process (2 workers), its output to `output`."""
    stderr = subprocess.STDOUT if output == subprocess.PIPE else output
    return subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from plait.experiment.runs.parameter_server import main; "
                             "main(Path(sys.argv[1]), 2, False, [], None)",
                             str(config_path)], stdout=output, stderr=stderr)


@pytest.mark.parametrize("signum,replication", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_plait_train_stopped_by_a_signal_leaves_final_checkpoints_and_resumes(tmp_path, signum, replication):
    """The launcher stops the workers, every server writes a final checkpoint (checkpoint_every = 0: the only
    one), the process exits with 128 + the signal; `--resume` then finishes the run from those checkpoints."""
    sync = f'servers = 2\nreplication = {replication}\nfailover_s = 0.5'
    config_path = write_config(tmp_path / "cfg.toml", tmp_path, "sig", sync, steps=100_000)
    launcher = start_launcher(config_path, subprocess.PIPE)
    run_dir = tmp_path / "sig"
    try:
        wait_for(lambda: any(r.get("step", 0) >= 5 for r in read_metrics(run_dir / "metrics.jsonl")), 120,
                 "training")
        launcher.send_signal(signum)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signum, output.decode(errors="replace")[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by"] == signal.Signals(signum).name
    names = [f"server-{i}" for i in range(2)] + ([f"server-{i}-r1" for i in range(2)] if replication > 1 else [])
    reached = []
    for name in names:
        events = [e["event"] for e in read_metrics(run_dir / "servers" / f"{name}.jsonl")]
        assert events[-2:] == ["checkpoint", "stopped"] and events.count("checkpoint") == 1
        snapshot = load_shards(run_dir / "servers" / f"{name}.npz")
        reached.append(min(min(shard.clocks) for shard in snapshot.shards.values()))
    assert min(reached) >= 4
    config = load_run_config(config_path, [])
    config.train.steps = max(reached) + 4
    summary = run_ps(config, num_workers=2, resume=True, timeout_s=240, show_progress=False)
    assert summary.stopped_by is None and summary.final["step"] == config.train.steps
    for rank in range(2):
        steps = [r["step"] for r in read_metrics(run_dir / f"worker-{rank}.jsonl")]
        assert steps[-1] == config.train.steps - 1


def test_stop_signals_notes_the_first_signal_and_restores_the_handlers_after():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here, and returns: nothing is raised
        os.kill(os.getpid(), signal.SIGINT)  # a second one, mid-shutdown: noted nowhere, raises nothing
        time.sleep(0.01)
    assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_lets_the_launcher_finish_what_it_was_doing_then_stops_the_run(tmp_path, monkeypatch):
    """SIGINT arrives while the launcher's main thread is in the middle of other code (its worker supervision here,
    standing in for a library's critical section, such as tensorboard's writer queue): that code runs to its end, the
    run then stops between two steps of its loop, the servers leave final checkpoints and no process is left."""
    config = load_run_config(write_config(tmp_path / "cfg.toml", tmp_path, "flag", "servers = 2", steps=100_000), [])
    supervise, clusters, section = LocalCluster.supervise_workers, [], []

    def supervise_signalled_midway(self, failed):
        clusters.append(self)
        if (self.run_dir / "start").exists() and not section:  # training has started
            section.append("entered")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs during this: a handler that raised would end the section here
            section.append("finished")
        return supervise(self, failed)

    monkeypatch.setattr(LocalCluster, "supervise_workers", supervise_signalled_midway)
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert section == ["entered", "finished"]
    assert summary.stopped_by == "SIGINT"
    assert all(process.poll() is not None for process in clusters[0].servers + clusters[0].workers)
    for index in range(2):
        events = [e["event"] for e in read_metrics(tmp_path / "flag" / "servers" / f"server-{index}.jsonl")]
        assert events[-2:] == ["checkpoint", "stopped"]


# A server that never acknowledges SHUTDOWN and stays stuck (as on a hung disk): SIGTERM is only noted (in the file
# named by its first argument), SIGKILL ends it.
STUCK_SERVER = """
import signal, sys, time
from pathlib import Path
from plait.ps import server
from plait.ps.node import main
from plait.ps.wire import Op
handle = server.ParameterServer.handle
def handle_but_stick_at_shutdown(self, peer, header, payload):
    if header.op == Op.SHUTDOWN:
        signal.signal(signal.SIGTERM, lambda *_: Path(sys.argv[1]).touch())
        while True:
            time.sleep(1)
    handle(self, peer, header, payload)
server.ParameterServer.handle = handle_but_stick_at_shutdown
main(sys.argv[2:])
"""


def test_a_server_stuck_at_shutdown_is_terminated_then_killed_and_the_launcher_exits(tmp_path, monkeypatch):
    config = load_run_config(write_config(tmp_path / "cfg.toml", tmp_path, "stuck", "servers = 2", steps=20), [])
    marker = tmp_path / "sigterm-received"

    def server_0_stuck(role, **arguments):
        command = node_command(role, **arguments)
        if role == "server" and arguments["index"] == 0:
            return [sys.executable, "-c", STUCK_SERVER, str(marker), *command[3:]]
        return command

    monkeypatch.setattr(launcher, "node_command", server_0_stuck)
    monkeypatch.setattr(coordinator, "SHUTDOWN_WAIT_S", 1.0)
    monkeypatch.setattr(coordinator, "TERMINATE_WAIT_S", 1.0)
    run, clusters = LocalCluster.run, []
    monkeypatch.setattr(LocalCluster, "run", lambda self: clusters.append(self) or run(self))
    started = time.monotonic()
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert summary.stopped_by is None and summary.final["step"] == 20
    stuck, other = clusters[0].servers
    assert marker.exists() and stuck.returncode == -signal.SIGKILL  # SIGTERM first, then SIGKILL
    assert other.returncode == 0  # it acknowledged SHUTDOWN and exited
    assert time.monotonic() - started < 120


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie ended
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_launcher_killed_outright_leaves_no_process_running(tmp_path):
    """SIGKILL gives the launcher no chance to stop anything: its servers and workers end by themselves (the kernel
    sends them SIGTERM as their parent dies), each server with a final checkpoint."""
    config_path = write_config(tmp_path / "cfg.toml", tmp_path, "killed", "servers = 2", steps=100_000)
    launcher = start_launcher(config_path, subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    try:
        wait_for(lambda: any(r.get("step", 0) >= 3 for r in read_metrics(run_dir / "metrics.jsonl")), 120,
                 "training")
        processes = children_of(launcher.pid)
        assert len(processes) == 4  # two servers, two workers
    finally:
        launcher.kill()
        launcher.wait()
    wait_for(lambda: all(ended(pid) for pid in processes), 30, "end of the launcher's processes")
    for index in range(2):
        events = [e["event"] for e in read_metrics(run_dir / "servers" / f"server-{index}.jsonl")]
        assert events[-3:] == ["signalled", "checkpoint", "stopped"]
