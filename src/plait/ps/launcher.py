"""Start servers and workers on localhost as separate processes and supervise them, for the coordinator
(coordinator.py) that evaluates the model as it trains and ends the run.

The launcher (ps-lite's local.sh, in Python) runs `python -m plait.ps.node server|worker ...` for each process: the
functions `plait ps server|worker` run, so a local run and a multi-host run start the same programs. It is handed
its run (`plait.runtime.context.RunContext`) by the driver (plait/experiment/runs/parameter_server.py) and keeps its
own files under the run's path: servers/ (checkpoints, endpoints, event logs), logs/, worker-<r>.jsonl,
summary.json. Under sync.curve_keys the coordinator first issues each worker a key bound to its worker id
(security.py, trust.py) where the key directory lacks one. While the workers train it:

- restarts a server that died, on the same endpoint, from its checkpoint (workers reconnect and resend); with
  sync.replication = 2 it runs two processes per server (replica 0, then replica 1 of each range; process p is
  server p mod S, replica p // S), and a restarted one catches up from its live partner instead;
- restarts a worker that died (sync.max_worker_restarts times): it resumes at the clock the servers recorded for
  it, or, if they had dropped it meanwhile (sync.worker_timeout_s), at the slowest other worker's; past the limit
  it is noted as failed and the others carry on without it;
- injects the configured faults (SIGKILL a server at a step, or each server process in turn);
- ends every process it started, with every wait bounded (`end_processes`: SIGTERM, then SIGKILL); killed outright
  itself, its processes get SIGTERM from the kernel (node.end_with_parent, Linux);
- with sync.status_port >= 0, the coordinator serves a live dashboard of all this (dashboard.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from plait.ps.config import PSRunConfig
from plait.ps.coordinator import SERVERS_DIR, Coordinator, server_checkpoints
from plait.ps.dashboard import Processes
from plait.ps.divergence import WorkerDiverged
from plait.ps.node import PARENT_ENV, node_command
from plait.ps.restart_policy import Outcome, WorkerRestartPolicy
from plait.ps.server_config import server_name
from plait.ps.summary import ClusterSummary
from plait.ps.trainer import RESTART_ENV
from plait.runtime.context import RunContext
from plait.runtime.metrics_log import read_metrics

__all__ = ["SERVERS_DIR", "STARTUP_TIMEOUT_S", "LocalCluster", "end_processes", "server_checkpoints"]

STARTUP_TIMEOUT_S = 60.0
KILL_WAIT_S = 5.0  # after SIGKILL, how long the kernel may take to end a process before it is given up on


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def await_endpoint(path: Path, process: subprocess.Popen, name: str, log: Path) -> str:
    """The endpoint a server process writes once it listens; RuntimeError if it dies or stays silent."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ps {name} did not start (stage: launch):\n{tail(log)}")
        time.sleep(0.02)
    return path.read_text().strip()


def end_processes(processes: Iterable[subprocess.Popen], grace_s: float = 0.0) -> None:
    """End those that still run: SIGTERM first when `grace_s` > 0 (a server writes its final checkpoint, a worker
    ends), SIGKILL for what still runs after it. Every wait is bounded: a process SIGKILL does not end within
    KILL_WAIT_S (stuck in the kernel) is named on stderr and left."""
    running = [p for p in processes if p.poll() is None]
    deadline = time.monotonic() + grace_s
    for process in running:
        if grace_s > 0:
            process.terminate()
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    for process in running:
        try:
            process.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            print(f"warning: process {process.pid} did not end {KILL_WAIT_S} s after SIGKILL", file=sys.stderr,
                  flush=True)


class LocalCluster:
    """`config_path` is the resolved config the processes read (the driver wrote it); the records, the progress
    (over the slowest worker's clock, as the evaluator sees it) and resume come from `run`."""

    def __init__(self, config: PSRunConfig, config_path: Path, run: RunContext, num_workers: int,
                 timeout_s: float = 3600.0):
        config.check_workers(num_workers)
        self.config, self.config_path = config, Path(config_path)
        self.run_dir = run.path
        self.num_workers, self.resume, self.timeout_s = num_workers, run.resume, timeout_s
        self.state_dir = self.run_dir / SERVERS_DIR
        self.logs_dir = self.run_dir / "logs"
        self.servers: list[subprocess.Popen] = []       # one per server process: replica r of server i is r*S + i
        self.workers: list[subprocess.Popen] = []
        self.endpoints: list[str] = []                  # every server process's, in the same order
        self.num_processes = config.sync.servers * config.sync.replication
        self.restarts = [0] * self.num_processes
        self.restarted_at = [0.0] * self.num_processes  # wall time of each process's last restart
        self.restart_policy = WorkerRestartPolicy(config.sync.max_worker_restarts, num_workers, self.run_dir)
        self.worker_restarts = self.restart_policy.restarts  # per worker, counted by the policy
        self.note: Callable[[dict[str, Any]], None] = lambda record: None  # the coordinator sets its own
        self.kills = config.fault.kill_plan(config.sync.servers, self.num_processes)
        self.coordinator = Coordinator(config, run, self, num_workers, timeout_s)
        self._files: list = []

    def run(self) -> ClusterSummary:
        return self.coordinator.run()

    @property
    def failed_workers(self) -> list[int]:  # past sync.max_worker_restarts: the others go on without them
        return self.coordinator.failed_workers

    # -- processes ----------------------------------------------------------------------------------------------
    def _spawn(self, role: str, arguments: dict[str, Any], log_name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs_dir / log_name, "ab")
        self._files.append(log)
        cmd = node_command(role, config=str(self.config_path), workers=self.num_workers, **arguments)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, PARENT_ENV: str(os.getpid()), **(env or {})})

    @property
    def primaries(self) -> list[str]:
        return self.endpoints[:self.config.sync.servers]

    @property
    def backups(self) -> list[str]:
        return self.endpoints[self.config.sync.servers:]

    def _name(self, process: int) -> str:
        return server_name(process % self.config.sync.servers, process // self.config.sync.servers)

    def _start_worker(self, rank: int, restart: int = 0) -> subprocess.Popen:
        # A restart joins the start barrier too: if its first life died before saying ready, the others are still
        # waiting there (once the start is given, the barrier lets it through at once).
        arguments = {"rank": rank, "servers": self.primaries, "backups": self.backups, "run_dir": str(self.run_dir),
                     "wait_start": True}
        return self._spawn("worker", arguments, f"worker-{rank}.log", env={RESTART_ENV: str(restart)})

    def _start_server(self, process: int, bind: str, fresh: bool) -> subprocess.Popen:
        servers = self.config.sync.servers
        arguments = {"index": process % servers, "replica": process // servers, "bind": bind,
                     "state_dir": str(self.state_dir), "fresh": fresh}
        return self._spawn("server", arguments, f"{self._name(process)}.log")

    def start_servers(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for process in range(self.num_processes):
            (self.state_dir / f"{self._name(process)}.endpoint").unlink(missing_ok=True)
            self.servers.append(self._start_server(process, f"tcp://{self.config.sync.host}:0",
                                                   fresh=not self.resume))
        try:
            self.endpoints = [await_endpoint(self.state_dir / f"{self._name(p)}.endpoint", self.servers[p],
                                             self._name(p), self.logs_dir / f"{self._name(p)}.log")
                              for p in range(self.num_processes)]
        except RuntimeError:
            self.stop()
            raise

    def start_workers(self) -> None:
        self.workers = [self._start_worker(rank) for rank in range(self.num_workers)]

    def workers_ready(self) -> bool:
        return all((self.run_dir / f"ready-{rank}").exists() or proc.poll() is not None
                   for rank, proc in enumerate(self.workers))

    def release_workers(self) -> None:
        (self.run_dir / "start").touch()

    def server_restarts(self) -> int:
        return sum(self.restarts)

    def worker_log(self, rank: int) -> Path:
        return self.run_dir / f"worker-{rank}.jsonl"

    def servers_running(self) -> bool:
        return any(p.poll() is None for p in self.servers)

    def processes(self) -> Processes:
        return Processes([p.poll() is None for p in self.workers], list(self.worker_restarts),
                         list(self.failed_workers), [p.poll() is None for p in self.servers], list(self.restarts))

    def kill_server(self, process: int) -> None:
        """SIGKILL server process `process` (replica r of server i is r*S + i; without replication, server i)."""
        os.kill(self.servers[process].pid, signal.SIGKILL)
        self.servers[process].wait(timeout=KILL_WAIT_S)

    def recovered(self, process: int) -> bool:
        """The process is up again since its last restart: listening, and with replication caught up from its
        partner (or serving, if both had restarted)."""
        if self.servers[process].poll() is not None:
            return False
        wanted = {"synced", "serving"} if self.config.sync.replication > 1 else {"listening"}
        return any(e.get("event") in wanted and e.get("time", 0) >= self.restarted_at[process]
                   for e in read_metrics(self.state_dir / f"{self._name(process)}.jsonl"))

    def supervise_servers(self) -> None:
        for process, proc in enumerate(self.servers):
            if proc.poll() is None:
                continue
            name = self._name(process)
            if self.restarts[process] >= self.config.sync.max_server_restarts:
                self.stop()
                raise RuntimeError(f"ps {name} died {self.restarts[process] + 1} times "
                                   f"(sync.max_server_restarts = {self.config.sync.max_server_restarts}):\n"
                                   f"{tail(self.logs_dir / f'{name}.log')}")
            self.restarts[process] += 1
            self.restarted_at[process] = time.time()
            self.servers[process] = self._start_server(process, self.endpoints[process], fresh=False)
            replica = {"replica": process // self.config.sync.servers} if self.config.sync.replication > 1 else {}
            self.note({"event": "server_restarted", "server": process % self.config.sync.servers, **replica,
                         "exit_code": proc.returncode, "time": time.time()})

    def supervise_workers(self, failed: list[int]) -> bool:
        """Restart the workers that died (restart_policy.py: up to sync.max_worker_restarts each), note those past
        the limit as failed; True while any worker is still running."""
        for rank, proc in enumerate(self.workers):
            if proc.poll() is None or rank in failed:
                continue
            decision = self.restart_policy.after_exit(rank, proc.returncode)
            if decision.outcome is Outcome.DIVERGED:
                assert decision.diverged is not None
                self.note(decision.diverged)
                raise WorkerDiverged(f"{decision.diverged['reason']}. The servers' checkpoints in {self.state_dir} "
                                     "hold the last good state (written as the run stops): continue with --resume")
            if decision.outcome is Outcome.RESTART:
                self.workers[rank] = self._start_worker(rank, restart=self.worker_restarts[rank])
                self.note({"event": "worker_restarted", "worker": rank, "exit_code": proc.returncode,
                           "time": time.time()})
            elif decision.outcome is Outcome.FAILED:
                failed.append(rank)
                self.note({"event": "worker_failed", "worker": rank, "exit_code": proc.returncode,
                           "time": time.time()})
        return any(p.poll() is None for p in self.workers)

    def stop_workers(self, grace_s: float = 5.0) -> None:
        end_processes(self.workers, grace_s)

    def stop(self, grace_s: float = 0.0) -> None:
        end_processes(self.workers + self.servers, grace_s)
        for f in self._files:
            f.close()
        self._files.clear()

    def inject_faults(self, step: int) -> None:
        """Kill the next server of the fault plan once its step is reached and the last one killed is back."""
        if not self.kills or step < self.kills[0][0]:
            return
        if any(self.restarts[p] and not self.recovered(p) for p in range(self.num_processes)):
            return  # one failure at a time: the last one killed is not back yet
        _, process = self.kills.pop(0)
        self.kill_server(process)
        replica = {"replica": process // self.config.sync.servers} if self.config.sync.replication > 1 else {}
        self.note({"event": "server_killed", "server": process % self.config.sync.servers, **replica,
                   "step": step, "time": time.time()})
