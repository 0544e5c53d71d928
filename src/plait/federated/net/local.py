"""Start a server and clients as local processes (tests, benchmarks, trying it out on one machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(config: Path, log_path: Path, *, resume: bool = False, overrides: list[str] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "plait.cli", "fl", "server", str(config)]
    args += ["--resume"] if resume else []
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(args, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=_env())


def start_client(config: Path, address: str, client_id: int, log_path: Path, *, certs: Path | None = None,
                 tls: bool | None = None, extra: list[str] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "plait.cli", "fl", "client", "--server", address, "--data", str(config),
            "--id", str(client_id)]
    if certs is not None:
        args += ["--certs", str(certs)]
    if tls is not None:
        args += ["--tls" if tls else "--no-tls"]
    args += list(extra)
    return subprocess.Popen(args, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=_env())


def wait_for_server(run_dir: Path, process: subprocess.Popen, timeout: float = 60,
                    after: float = 0.0) -> dict[str, Any]:
    """The server's server.json (written once it listens), newer than `after` (a time.time())."""
    info_path = Path(run_dir) / "server.json"
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening")
        if info_path.exists() and info_path.stat().st_mtime >= after:
            try:
                info = json.loads(info_path.read_text())
                if info.get("pid") == process.pid:
                    return info
            except json.JSONDecodeError:
                pass  # being written
        time.sleep(0.05)
    raise TimeoutError(f"server did not write {info_path} within {timeout} s")


def fetch_status(host: str, port: int, path: str = "/status.json", timeout: float = 5) -> Any:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as reply:
        body = reply.read()
    return json.loads(body) if path.endswith(".json") else body.decode()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=timeout)


def small_config(root: Path, *, name: str = "net", num_clients: int = 5, rounds: int = 3, **net: Any) -> dict:
    """A fast config (2NN, a few local steps on MNIST) as TOML-able tables; `net` entries override [net]."""
    return {
        "run": {"name": name, "root": str(root), "seed": 3, "threads": 1},
        "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": num_clients, "partition": "shards", "shards_per_client": 2},
        "fl": {"rounds": rounds, "fraction": 0.6, "min_clients": 2, "eval_every": 0,
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.05, "max_steps": 4}},
        "net": {"host": "127.0.0.1", "port": 0, "status_port": 0, "tls": "off", "auth": "none",
                "wait_for_clients": num_clients, "heartbeat_s": 0.3, "heartbeat_timeout_s": 2.0,
                "round_timeout_s": 60.0, "poll_s": 2.0, "linger_s": 3.0, **net},
    }


def write_config(path: Path, config: dict) -> Path:
    import tomli_w

    Path(path).write_bytes(tomli_w.dumps(config).encode())
    return Path(path)


@contextmanager
def cluster(config: Path, log_dir: Path, run_dir: Path, num_clients: int,
            client_args: Callable[[int], dict[str, Any]] = lambda cid: {}) -> Iterator[tuple[Any, dict, list]]:
    """A server and clients 0..num_clients-1 (logs in `log_dir`), killed on exit if still running.
    Yields (server, its server.json, clients); `client_args(cid)` adds start_client keyword arguments."""
    server = start_server(config, Path(log_dir) / "server.log")
    clients: list[subprocess.Popen] = []
    try:
        info = wait_for_server(run_dir, server)
        clients = [start_client(config, f"127.0.0.1:{info['port']}", cid, Path(log_dir) / f"client{cid}.log",
                                **client_args(cid)) for cid in range(num_clients)]
        yield server, info, clients
    finally:
        for process in [server, *clients]:
            stop(process)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl (empty if it does not exist yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def simulate(config) -> tuple[Any, list[dict[str, Any]], Any]:
    """The in-process simulation of a network config: (final state, records, initial params), the reference that
    a networked run must reproduce. Stops where the networked run stops (a spent privacy budget)."""
    from plait.federated.simulation import build_server

    server = build_server(config.simulation())
    state, records = server.initial_state(), []
    while state.round < config.fl.rounds:
        state, record = server.run_round(state)
        records.append(record)
        if record.get("stop"):
            break
    return state, records, server.initial_params


@dataclass(slots=True)
class NetworkAndSimulation:
    """A networked run next to the in-process simulation of the same config: what a test compares."""
    server_code: int | None          # the server process's exit code (None: still running at the deadline)
    client_codes: list[int | None]
    records: list[dict[str, Any]]    # the networked run's metrics.jsonl
    checkpoint: dict[str, Any]       # its checkpoint.pt (empty if none was written)
    reference: Any                   # the simulation's final state
    ref_records: list[dict[str, Any]]
    initial: Any                     # the initial parameters
    info: dict[str, Any]             # the server's server.json (port, tls, ...)
    log_dir: Path

    def log(self, name: str, tail: int = 3000) -> str:
        """The end of server.log or client<K>.log, for assertion messages."""
        path = self.log_dir / name
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""


def run_against_simulation(config: dict[str, Any], work_dir: Path, num_clients: int,
                           client_args: Callable[[int], dict[str, Any]] = lambda cid: {},
                           server_timeout: float = 100, client_timeout: float = 30) -> NetworkAndSimulation:
    """Write `config` (as `small_config` makes it), start a server and `num_clients` clients on it (logs in
    `work_dir`), simulate the same config in this process meanwhile, wait for every process, and read the
    results; the caller asserts on what comes back."""
    from plait.federated.net.config import NetworkRunConfig
    from plait.runtime.checkpoint import load_checkpoint
    from plait.settings.config import from_dict

    work_dir = Path(work_dir)
    path = write_config(work_dir / "fl.toml", config)
    run_dir = Path(config["run"]["root"]) / config["run"]["name"]
    with cluster(path, work_dir, run_dir, num_clients, client_args) as (server, info, clients):
        reference, ref_records, initial = simulate(from_dict(NetworkRunConfig, config))
        server_code = _wait(server, server_timeout)
        # One deadline for all clients; after a failed server only a glance: they would retry for minutes.
        deadline = time.monotonic() + (client_timeout if server_code == 0 else 1.0)
        client_codes = [_wait(client, max(deadline - time.monotonic(), 0.01)) for client in clients]
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else {}
    return NetworkAndSimulation(server_code, client_codes, read_records(run_dir), checkpoint, reference,
                                ref_records, initial, info, work_dir)


def _wait(process: subprocess.Popen, timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
