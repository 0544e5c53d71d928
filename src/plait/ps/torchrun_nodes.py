"""The coordinator's view of a run under torchrun (rank 0): the servers and workers are other ranks' processes,
on any host, known through torchrun's store (the keys of torchrun_roles.py) instead of as subprocesses."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.ps.config import PSRunConfig
from plait.ps.dashboard import Processes
from plait.ps.divergence import WorkerDiverged
from plait.ps.launcher import STARTUP_TIMEOUT_S
from plait.ps.torchrun_roles import END_KEY, PIECES_KEY, START_KEY, STOP_KEY, server_key, wait_key, worker_key

STOP_WAIT_S = 20.0  # how long the worker ranks have to report their workers stopped


class TorchrunNodes:
    def __init__(self, config: PSRunConfig, store: Any, run_dir: Path, num_workers: int):
        self.config, self.store, self.run_dir, self.num_workers = config, store, Path(run_dir), num_workers
        self.endpoints: list[str] = []
        self.note: Callable[[dict[str, Any]], None] = lambda record: None  # the coordinator sets its own
        self.restarts = [0] * config.sync.servers
        self.worker_restarts = [0] * num_workers
        self.states: dict[int, str] = {}  # worker -> its rank's last word: done, failed, diverged, stopped
        self.failed: list[int] = []

    def _value(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def start_servers(self) -> None:
        self.endpoints = [wait_key(self.store, server_key(index, "endpoint"), STARTUP_TIMEOUT_S,
                                   f"endpoint from server {index} (rank {index + 1})")
                          for index in range(self.config.sync.servers)]

    def start_workers(self) -> None:
        self.store.set(PIECES_KEY, "1")

    def supervise_servers(self) -> None:
        for index in range(self.config.sync.servers):
            state = self._value(server_key(index, "state"))
            if state is not None and state.startswith("failed"):
                raise RuntimeError(f"ps server-{index} (rank {index + 1}) {state.removeprefix('failed: ')} "
                                   f"(sync.max_server_restarts = {self.config.sync.max_server_restarts}); its "
                                   f"log is logs/server-{index}.log on that rank's host")
            restarts = int(self.store.add(server_key(index, "restarts"), 0))
            if restarts > self.restarts[index]:
                self.restarts[index] = restarts
                self.note({"event": "server_restarted", "server": index, "time": time.time()})

    def supervise_workers(self, failed: list[int]) -> bool:
        self.failed = failed
        for rank in range(self.num_workers):
            restarts = int(self.store.add(worker_key(rank, "restarts"), 0))
            if restarts > self.worker_restarts[rank]:
                self.worker_restarts[rank] = restarts
                self.note({"event": "worker_restarted", "worker": rank, "time": time.time()})
            if rank in self.states or (state := self._value(worker_key(rank, "state"))) is None:
                continue
            self.states[rank] = state
            if state.startswith("diverged"):
                diverged = json.loads(state.removeprefix("diverged: "))
                self.note(diverged)
                raise WorkerDiverged(f"{diverged['reason']}. The servers' checkpoints hold the last good state "
                                     "(written as the run stops): continue with --resume")
            if state.startswith("failed"):
                failed.append(rank)
                self.note({"event": "worker_failed", "worker": rank, "reason": state, "time": time.time()})
        return len(self.states) < self.num_workers

    def workers_ready(self) -> bool:
        return all(self.store.check([worker_key(rank, "ready")]) or rank in self.states
                   for rank in range(self.num_workers))

    def release_workers(self) -> None:
        self.store.set(START_KEY, "1")

    def server_restarts(self) -> int:
        return sum(self.restarts)

    def inject_faults(self, step: int) -> None:
        pass  # refused under torchrun (torchrun_roles.torchrun_workers)

    def processes(self) -> Processes:
        return Processes([rank not in self.states for rank in range(self.num_workers)], list(self.worker_restarts),
                         list(self.failed), [self._value(server_key(i, "state")) is None
                                             for i in range(self.config.sync.servers)], list(self.restarts))

    def stop_workers(self) -> None:
        self.store.set(STOP_KEY, "1")
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline and not all(self.store.check([worker_key(rank, "state")])
                                                      for rank in range(self.num_workers)):
            time.sleep(0.05)

    def servers_running(self) -> bool:
        return not all(self.store.check([server_key(index, "state")]) for index in range(self.config.sync.servers))

    def stop(self, grace_s: float = 0.0) -> None:
        # The server ranks end what still runs: SIGTERM (a final checkpoint), SIGKILL after their own EXIT_WAIT_S.
        self.store.set(END_KEY, "1")

    def worker_log(self, rank: int) -> Path:
        return self.run_dir / f"worker-{rank}.jsonl"  # on this host only when the worker ran here
