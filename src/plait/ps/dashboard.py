"""The local launcher's live dashboard (`sync.status_port`): a page that follows a parameter-server run as it trains.

It shows test accuracy, test loss and training loss against the step or the time; each worker's clock, live and
over time; the staleness spread (fastest minus slowest worker's clock) with the SSP bound drawn under SSP; each
server's shard (keys, pieces, elements), updates applied, traffic and restarts; the throughput; the run's settings
and its events (a server killed or restarted, a worker dropped, restarted or failed).

Every figure comes from what the processes already write; there is no second metrics path:

- the evaluator's records and the launcher's events: handed to `note` as the launcher writes them to the run;
- each worker's clock, training loss, staleness and step times: its worker-<r>.jsonl, one line per step;
- each server's shard and work: the "stats" event its servers/<name>.jsonl gets every second while it works, and
  the workers it dropped or saw rejoin: the same log's events;
- which processes run and how often each was restarted: the launcher itself (`Processes`).

A worker's clock on the page is the number of steps it has logged. A worker may be one step further than its log
says (its push is in, the answer not yet logged), so the spread of logged clocks can exceed an SSP bound S by one
for a moment; it does not stay above S + 1.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.ps.config import PSRunConfig
from plait.ps.server_config import server_name
from plait.web import JsonlTail, StatusBoard, finite, serve_page, settings_table

PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
SCRIPT = (Path(__file__).parent / "dashboard.js").read_text(encoding="utf-8")

MAX_POINTS = 400           # per chart line in status.json: longer series are thinned (the last point kept)
MAX_EVENTS = 100           # the newest events shown
RATE_WINDOW_S = 5.0        # throughput now: the samples of the last this many seconds
PUBLISH_EVERY_S = 0.5      # a new snapshot at most this often (the page polls once a second)
QUIET_SERVER_EVENTS = {"stats", "checkpoint"}  # shown in the server table, not in the event list
WORKER_STATES = {"dropped": "dropped", "rejoined": "running", "started_again": "running", "finished": "finished"}


@dataclass(slots=True)
class Processes:
    """What the launcher knows of its processes at one moment."""
    workers_running: list[bool]
    worker_restarts: list[int]
    failed_workers: list[int]
    servers_running: list[bool]       # one per server process: replica r of server i is r * servers + i
    server_restarts: list[int]


@dataclass(slots=True)
class _WorkerLog:
    tail: JsonlTail
    steps: list[tuple[int, float, float | None]] = field(default_factory=list)  # (clock, Unix time, train loss)
    last: dict[str, Any] = field(default_factory=dict)
    servers_say: tuple[float, str] = (0.0, "")  # (time, state) of the servers' latest word on it (dropped, ...)


@dataclass(slots=True)
class _ServerLog:
    tail: JsonlTail
    stats: dict[str, Any] = field(default_factory=dict)  # the latest "stats", "restored" or "stopped" figures
    role: str = ""
    last_event: str = ""


def _at(values: list[Any], index: int, default: Any) -> Any:
    """values[index], or `default` for a process the launcher has not started yet."""
    return values[index] if index < len(values) else default


def _thin(rows: list[Any], limit: int = MAX_POINTS) -> list[Any]:
    """Every k-th row, so that at most about `limit` remain, and always the last one."""
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    kept = rows[::stride]
    return kept if kept[-1] is rows[-1] else [*kept, rows[-1]]


class ClusterFeed:
    """Builds status.json from the run's logs. `started_unix` is when the run's elapsed time was 0 (on a resumed
    run, before the resume by the time it had already trained): the page's time axis is elapsed_s."""

    def __init__(self, config: PSRunConfig, run_dir: Path, num_workers: int, started_unix: float):
        self.config, self.num_workers, self.started_unix = config, num_workers, started_unix
        sync = config.sync
        self.ssp_bound = int(sync.consistency.staleness) if sync.consistency.name == "ssp" else None
        self.workers = [_WorkerLog(JsonlTail(Path(run_dir) / f"worker-{rank}.jsonl")) for rank in range(num_workers)]
        self.names = [server_name(p % sync.servers, p // sync.servers) for p in range(sync.servers * sync.replication)]
        self.servers = [_ServerLog(JsonlTail(Path(run_dir) / "servers" / f"{name}.jsonl")) for name in self.names]
        self.settings = {**settings_table(config), "workers": num_workers}
        self.evaluations: list[dict[str, Any]] = []
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.spread: list[tuple[float, int]] = []   # (elapsed_s, clock spread), one point per snapshot

    def elapsed(self, unix_time: float) -> float:
        return unix_time - self.started_unix

    # -- what comes in ------------------------------------------------------------------------------------------
    def note(self, record: dict[str, Any]) -> None:
        """A record the launcher writes to the run: an evaluation or an event."""
        if "event" in record:
            self._event("launcher", record)
        elif "test_loss" in record:
            self.evaluations.append({k: finite(record.get(k)) for k in ("step", "elapsed_s", "test_accuracy",
                                                                         "test_loss")})

    def _event(self, source: str, record: dict[str, Any]) -> None:
        when = record.get("time") or time.time()
        detail = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("event", "time"))
        self.events.append({"time": when, "elapsed_s": self.elapsed(when), "source": source,
                            "event": record["event"], "detail": detail})

    def _read_logs(self) -> None:
        for worker in self.workers:
            new, restarted = worker.tail.read()
            if restarted:  # a restarted worker rewrote its log up to where it resumed
                worker.steps, worker.last = [], {}
            for record in new:
                if isinstance(record.get("step"), int) and isinstance(record.get("time"), (int, float)):
                    worker.steps.append((record["step"], record["time"], finite(record.get("train_loss"))))
                    worker.last = record
        for name, server in zip(self.names, self.servers):
            for record in server.tail.read()[0]:
                event = record.get("event", "")
                if event not in QUIET_SERVER_EVENTS:
                    server.last_event = event
                    self._event(name, {k: v for k, v in record.items() if k not in ("server", "replica")})
                if event in ("stats", "restored", "stopped"):
                    server.stats.update({k: v for k, v in record.items() if k not in ("event", "time", "server")})
                if event in ("promoted", "serving", "streaming"):
                    server.role = "primary"
                elif event in ("demoted", "synced", "rejoining"):
                    server.role = "backup"
                if event in WORKER_STATES and isinstance(record.get("worker"), int) \
                        and 0 <= record["worker"] < self.num_workers:
                    worker = self.workers[record["worker"]]
                    if record.get("time", 0.0) >= worker.servers_say[0]:
                        worker.servers_say = (record.get("time", 0.0), WORKER_STATES[event])

    # -- what goes out ------------------------------------------------------------------------------------------
    def snapshot(self, phase: str, processes: Processes, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        self._read_logs()
        rows = self.worker_rows(processes, now)
        counted = [row["clock"] for row in rows if row["state"] in ("running", "finished") and row["clock"] > 0]
        spread = max(counted) - min(counted) if counted else None
        if spread is not None and (not self.spread or self.elapsed(now) - self.spread[-1][0] >= PUBLISH_EVERY_S):
            self.spread.append((self.elapsed(now), spread))
            if len(self.spread) > 4 * MAX_POINTS:
                self.spread = self.spread[::2]
        sync = self.config.sync
        return {
            "run": self.config.run.name, "phase": phase, "time": now, "elapsed_s": self.elapsed(now),
            "consistency": str(sync.consistency), "ssp_bound": self.ssp_bound, "steps": self.config.train.steps,
            "workers": self.num_workers, "servers": sync.servers, "replication": sync.replication,
            "batch_size": self.config.train.batch_size,
            "slowest_clock": min(counted) if counted else None, "clock_spread": spread,
            "samples_per_s": sum(row["samples_per_s"] for row in rows),
            "series": _thin(self.evaluations), "train": self.train_series(), "throughput": self.throughput(now),
            "spread": [{"elapsed_s": t, "spread": s} for t, s in _thin(self.spread)],
            "clocks": [{"worker": rank, "points": _thin([[self.elapsed(t), clock + 1] for clock, t, _ in w.steps],
                                                        MAX_POINTS // 2)}
                       for rank, w in enumerate(self.workers)],
            "worker_rows": rows, "server_rows": self.server_rows(processes),
            "events": sorted(self.events, key=lambda e: e["time"])[-MAX_EVENTS:], "settings": self.settings,
        }

    def worker_rows(self, processes: Processes, now: float) -> list[dict[str, Any]]:
        rows = []
        for rank, worker in enumerate(self.workers):
            clock = worker.steps[-1][0] + 1 if worker.steps else 0
            recent = 0  # steps logged in the last RATE_WINDOW_S (the log is in time order)
            while recent < len(worker.steps) and worker.steps[-1 - recent][1] > now - RATE_WINDOW_S:
                recent += 1
            last = worker.last
            rows.append({"worker": rank, "clock": clock, "state": self._state(rank, clock, processes),
                         "train_loss": finite(last.get("train_loss")), "staleness": last.get("staleness"),
                         "step_s": finite(last.get("step_s")),
                         "samples_per_s": recent * self.config.train.batch_size / RATE_WINDOW_S,
                         "restarts": _at(processes.worker_restarts, rank, 0),
                         "last_step_s_ago": now - worker.steps[-1][1] if worker.steps else None})
        return rows

    def _state(self, rank: int, clock: int, processes: Processes) -> str:
        if rank in processes.failed_workers:
            return "failed"
        if clock >= self.config.train.steps:
            return "finished"
        running = _at(processes.workers_running, rank, None)
        if running is None:
            return "starting"  # not launched yet
        if not running:
            return "restarting" if clock or processes.worker_restarts[rank] else "exited"
        if self.workers[rank].servers_say[1] == "dropped":
            return "dropped"
        return "running" if clock else "starting"

    def train_series(self) -> list[dict[str, Any]]:
        """The workers' training loss per clock (their mean), at the mean time they logged it."""
        by_clock: dict[int, list[float]] = {}
        for worker in self.workers:
            for clock, t, loss in worker.steps:
                if loss is not None:
                    entry = by_clock.setdefault(clock, [0.0, 0.0, 0])
                    entry[0] += loss
                    entry[1] += t
                    entry[2] += 1
        rows = [{"step": clock + 1, "elapsed_s": self.elapsed(t / n), "train_loss": loss / n}
                for clock, (loss, t, n) in sorted(by_clock.items())]
        if len(rows) <= MAX_POINTS:
            return rows
        size = math.ceil(len(rows) / MAX_POINTS)  # mean over runs of consecutive clocks: noise averaged, not dropped
        return [{k: sum(r[k] for r in rows[i:i + size]) / len(rows[i:i + size]) for k in rows[0]}
                for i in range(0, len(rows), size)]

    def throughput(self, now: float) -> list[dict[str, Any]]:
        """Samples per second of all workers together, in bins of equal time (the first bin, which the workers
        started within, and the bin in progress left out)."""
        times = [self.elapsed(t) for worker in self.workers for _, t, _ in worker.steps]
        if not times:
            return []
        width = max(1.0, math.ceil(self.elapsed(now) / MAX_POINTS))
        counts: dict[int, int] = {}
        for t in times:
            counts[int(t // width)] = counts.get(int(t // width), 0) + 1
        done = int(self.elapsed(now) // width)  # the bin in progress
        first = min(counts) + 1
        return [{"elapsed_s": (b + 1) * width, "samples_per_s": counts.get(b, 0) * self.config.train.batch_size / width}
                for b in range(first, done)]

    def server_rows(self, processes: Processes) -> list[dict[str, Any]]:
        servers = self.config.sync.servers
        rows = []
        for process, (name, server) in enumerate(zip(self.names, self.servers)):
            rows.append({"name": name, "server": process % servers, "replica": process // servers,
                         "running": _at(processes.servers_running, process, False),
                         "restarts": _at(processes.server_restarts, process, 0),
                         "role": server.role, "last_event": server.last_event,
                         **{k: server.stats.get(k) for k in ("keys", "pieces", "elements", "updates", "bytes_in",
                                                             "bytes_out")}})
        return rows


class Dashboard:
    """The feed, served on `sync.status_host:sync.status_port` while the launcher runs."""

    def __init__(self, config: PSRunConfig, run_dir: Path, num_workers: int, started_unix: float):
        self.feed = ClusterFeed(config, run_dir, num_workers, started_unix)
        self.board = StatusBoard()
        self.host, self.port = config.sync.status_host, config.sync.status_port
        self.httpd: Any = None
        self._next = 0.0

    def serve(self) -> str:
        """Start the page; returns its address (the port bound when sync.status_port = 0)."""
        try:
            self.httpd = serve_page(self.board, PAGE, SCRIPT, self.host, self.port)
        except OSError as err:
            raise OSError(err.errno, f"ps dashboard: cannot serve on sync.status_host:sync.status_port = "
                                     f"{self.host}:{self.port}: {err.strerror}") from err
        return f"http://{self.host}:{self.httpd.server_address[1]}/"

    def due(self) -> bool:
        """Whether the last snapshot is PUBLISH_EVERY_S old (the page polls once a second)."""
        return time.monotonic() >= self._next

    def publish(self, phase: str, processes: Processes) -> None:
        self._next = time.monotonic() + PUBLISH_EVERY_S
        self.board.publish(self.feed.snapshot(phase, processes))

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
