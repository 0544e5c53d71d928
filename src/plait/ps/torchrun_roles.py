"""`plait train CONFIG` under torchrun: each rank takes a role by its number, on whatever host torchrun put it.

    rank 0            the coordinator (coordinator.py with `TorchrunNodes`, torchrun_nodes.py): creates the pieces,
                      releases the workers, evaluates, writes the run directory's records, ends the run (SHUTDOWN:
                      final checkpoints)
    ranks 1..S        one per server (S = sync.servers): each starts one server process on its host, binding
                      tcp://<sync.host>:0, publishes where it listens, and restarts it on the same port from its
                      checkpoint and journal if it dies (sync.max_server_restarts times)
    ranks S+1..       one per worker (W = WORLD_SIZE - 1 - S of them, worker ids 0..W-1): each starts one worker
                      process and restarts it if it dies (sync.max_worker_restarts times)

The ranks need no process group: they hand each other endpoints and states through torchrun's store (the keys
below). Every host keeps the files of its own processes under the same run path as the local launcher does
(servers/, logs/, worker-<r>.jsonl); rank 0's holds the records. Others dial a server at sync.host, or, when it
binds every interface (0.0.0.0, "*"), at PLAIT_PS_ADVERTISE_HOST if set, else this host's name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from plait.ps.config import PSRunConfig
from plait.ps.coordinator import SERVERS_DIR
from plait.ps.launcher import STARTUP_TIMEOUT_S, await_endpoint, end_processes, tail
from plait.ps.node import node_command, signal_on_parent_death
from plait.ps.restart_policy import Outcome, WorkerRestartPolicy
from plait.ps.server_config import server_name
from plait.ps.trainer import RESTART_ENV
from plait.runtime.metrics_log import MetricsLog

ADVERTISE_ENV = "PLAIT_PS_ADVERTISE_HOST"
RUN_KEY = "ps/run"          # rank 0 prepared the run directory: "fresh" or "resume"
PIECES_KEY = "ps/pieces"    # the model's pieces exist on the servers: workers may start
START_KEY = "ps/start"      # every worker is ready: go
STOP_KEY = "ps/stop"        # a signal stopped the run: workers end
END_KEY = "ps/end"          # the run is over: servers end (after SHUTDOWN's final checkpoint)
EXIT_WAIT_S = 15.0          # how long an ended server or worker has before it is terminated


def server_key(process: int, what: str) -> str:
    return f"ps/server/{process}/{what}"   # endpoint, restarts, state


def worker_key(rank: int, what: str) -> str:
    return f"ps/worker/{rank}/{what}"      # ready, restarts, state


def torchrun_workers(config: PSRunConfig, world_size: int) -> int:
    """How many workers a torchrun world of `world_size` ranks holds (one coordinator, one rank per server);
    ValueError, naming the setting, for a world or config this layout cannot run."""
    if config.sync.replication != 1:
        raise ValueError("sync.replication = 2 is not supported under torchrun (one rank supervises one server "
                         "process): set sync.replication = 1, or run replicated servers with plait train --nproc")
    if config.fault.kill_server >= 0:
        raise ValueError("fault.kill_server is injected by the local launcher only (plait train --nproc); under "
                         "torchrun kill a server process yourself: its rank restarts it")
    workers = world_size - 1 - config.sync.servers
    if workers < 1:
        raise ValueError(f"torchrun's world of {world_size} ranks has no worker: it needs 1 coordinator + "
                         f"sync.servers = {config.sync.servers} server ranks + at least 1 worker rank")
    config.check_workers(workers)
    return workers


def advertised_endpoint(bound: str, host: str) -> str:
    """The endpoint others dial for a server bound to `bound` (tcp://HOST:PORT) on sync.host = `host`."""
    port = bound.rsplit(":", 1)[1]
    name = os.environ.get(ADVERTISE_ENV) or (socket.getfqdn() if host in ("0.0.0.0", "*", "") else host)
    return f"tcp://{name}:{port}"


def wait_key(store: Any, key: str, timeout_s: float, what: str) -> str:
    """The value of `key` once some rank set it; TimeoutError naming `what` after `timeout_s`."""
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except RuntimeError as err:  # torch's DistStoreError
        raise TimeoutError(f"ps under torchrun: no {what} after {timeout_s:.0f} s ({err})") from None
    return store.get(key).decode()


def _terminate(process: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM (a server writes its final checkpoint), SIGKILL after `grace_s`; the exit code (None: SIGKILL did not
    end it in time)."""
    end_processes([process], grace_s)
    return process.returncode


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL it when its supervisor rank dies, so a rank torchrun killed leaves
    no process behind to hold its port or write its files while the next attempt runs (the server's journal keeps
    what it acknowledged). Elsewhere nothing: a dead rank's processes must then be ended by hand."""
    signal_on_parent_death(signal.SIGKILL)


class _SignalEnds(Exception):
    pass


def _end_on_signal() -> None:
    """SIGTERM or SIGINT (torchrun stopping the group) ends the supervisor, which then ends its process."""
    def on_signal(signum: int, _frame: object) -> None:
        for each in (signal.SIGTERM, signal.SIGINT):  # the ending that follows is not interrupted again
            signal.signal(each, signal.SIG_IGN)
        raise _SignalEnds(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


class _Supervisor:
    def __init__(self, config: PSRunConfig, config_path: Path, overrides: list[str], store: Any, rank: int,
                 num_workers: int):
        self.config, self.store, self.rank, self.num_workers = config, store, rank, num_workers
        self.config_path, self.overrides = str(Path(config_path).resolve()), list(overrides)
        self.run_dir = Path(config.run.root) / config.run.name
        self.resume = wait_key(store, RUN_KEY, STARTUP_TIMEOUT_S + 600, "run directory from rank 0") == "resume"
        self.logs_dir = self.run_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.events = MetricsLog(self.logs_dir / f"rank-{rank}.jsonl")
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # > 0: torchrun restarted the group
        (self.run_dir / "ranks").mkdir(exist_ok=True)
        (self.run_dir / "ranks" / f"rank{rank}.pid").write_text(str(os.getpid()))
        self._files: list = []

    def spawn(self, role: str, arguments: dict[str, Any], log_name: str, restart: int = 0) -> subprocess.Popen:
        log = open(self.logs_dir / log_name, "ab")
        self._files.append(log)
        cmd = node_command(role, config=self.config_path, workers=self.num_workers, overrides=self.overrides,
                           **arguments)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, RESTART_ENV: str(restart + self.attempt)},
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def event(self, record: dict[str, Any]) -> None:
        record = {**record, "rank": self.rank, "time": time.time()}
        self.events.write(record)
        print(f"ps rank {self.rank}: {json.dumps(record)}", flush=True)

    def close(self) -> None:
        self.events.close()
        for f in self._files:
            f.close()


def supervise_server(config: PSRunConfig, config_path: Path, overrides: list[str], store: Any, rank: int,
                     num_workers: int) -> None:
    """Rank 1 + `index`: run server `index` until the coordinator ends the run, restarting it if it dies."""
    _end_on_signal()
    index = rank - 1
    me = _Supervisor(config, config_path, overrides, store, rank, num_workers)
    name, state_dir = server_name(index), me.run_dir / SERVERS_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / f"{name}.endpoint").unlink(missing_ok=True)

    def start(bind: str, fresh: bool) -> subprocess.Popen:
        process = me.spawn("server", {"index": index, "bind": bind, "state_dir": str(state_dir), "fresh": fresh},
                           f"{name}.log")
        (state_dir / f"{name}.pid").write_text(str(process.pid))
        return process

    process = start(f"tcp://{config.sync.host}:0", fresh=not me.resume)
    restarts = 0
    try:
        bound = await_endpoint(state_dir / f"{name}.endpoint", process, name, me.logs_dir / f"{name}.log")
        store.set(server_key(index, "endpoint"), advertised_endpoint(bound, config.sync.host))
        me.event({"event": "server_started", "server": index, "endpoint": bound})
        while not store.check([END_KEY]):
            code = process.poll()
            if code is None:
                time.sleep(0.05)
                continue
            if code == 0:
                break  # SHUTDOWN: its final checkpoint is written
            if restarts >= config.sync.max_server_restarts:
                store.set(server_key(index, "state"), f"failed: died {restarts + 1} times")
                raise RuntimeError(f"ps {name} died {restarts + 1} times (sync.max_server_restarts = "
                                   f"{config.sync.max_server_restarts}):\n{tail(me.logs_dir / f'{name}.log')}")
            restarts += 1
            process = start(bound, fresh=False)  # the same port: the workers reconnect and resend
            store.add(server_key(index, "restarts"), 1)
            me.event({"event": "server_restarted", "server": index, "exit_code": code})
        deadline = time.monotonic() + EXIT_WAIT_S  # SHUTDOWN is on its way: let it write the final checkpoint
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    except _SignalEnds as signalled:
        me.event({"event": "signalled", "signal": str(signalled)})
    finally:
        me.event({"event": "server_stopped", "server": index, "exit_code": _terminate(process, EXIT_WAIT_S)})
        store.set(server_key(index, "state"), "exited")
        me.close()


def supervise_worker(config: PSRunConfig, config_path: Path, overrides: list[str], store: Any, rank: int,
                     num_workers: int) -> None:
    """Rank 1 + S + `worker`: run worker `worker` to its last step, restarting it if it dies."""
    _end_on_signal()
    worker = rank - 1 - config.sync.servers
    me = _Supervisor(config, config_path, overrides, store, rank, num_workers)
    for stale in (me.run_dir / f"ready-{worker}", me.run_dir / "start"):
        stale.unlink(missing_ok=True)
    wait_key(store, PIECES_KEY, STARTUP_TIMEOUT_S + config.sync.wait_timeout_s, "model pieces from rank 0")
    servers = [store.get(server_key(index, "endpoint")).decode() for index in range(config.sync.servers)]

    def start(restart: int) -> subprocess.Popen:
        return me.spawn("worker", {"rank": worker, "servers": servers, "run_dir": str(me.run_dir),
                                   "wait_start": True}, f"worker-{worker}.log", restart=restart)

    policy = WorkerRestartPolicy(config.sync.max_worker_restarts, num_workers, me.run_dir)
    process, ready, released, state = start(0), False, False, "stopped"
    try:
        while not store.check([STOP_KEY]) and not store.check([END_KEY]):
            if not ready and (me.run_dir / f"ready-{worker}").exists():
                store.set(worker_key(worker, "ready"), "1")
                ready = True
            if not released and store.check([START_KEY]):
                (me.run_dir / "start").touch()
                released = True
            code = process.poll()
            if code is None:
                time.sleep(0.02)
                continue
            decision = policy.after_exit(worker, code)  # restart_policy.py, as the local launcher's
            if decision.outcome is Outcome.DONE:
                state = "done"
                break
            if decision.outcome is Outcome.DIVERGED:
                state = "diverged: " + json.dumps(decision.diverged)
                break
            if decision.outcome is Outcome.FAILED:
                state = f"failed: exit code {code}"
                break
            process = start(policy.restarts[worker])
            store.add(worker_key(worker, "restarts"), 1)
            me.event({"event": "worker_restarted", "worker": worker, "exit_code": code})
    except _SignalEnds as signalled:
        me.event({"event": "signalled", "signal": str(signalled)})
    finally:
        code = _terminate(process, 5.0)
        store.set(worker_key(worker, "state"), state)
        me.event({"event": "worker_stopped", "worker": worker, "state": state.split(":")[0], "exit_code": code})
        me.close()
