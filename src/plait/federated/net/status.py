"""The FL server's live dashboard: what it shows beyond the round loop's own snapshot (`DashboardFeed`), and its
page: dashboard.html and dashboard.js here, served with the shared charts, styles and bounded read-only HTTP server
of plait/web (`serve_status`).

The script draws test accuracy, loss, ε and cumulative MB against the round or elapsed time; then the round in
progress (selected, reported, dropped, refused, the deadline), a table of clients, refusal counters by reason, the
run's settings, elapsed time and ETA. The round loop publishes a fresh snapshot after every change; the port binds
127.0.0.1 unless net.status_host says otherwise.
"""

from __future__ import annotations

import heapq
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from plait.runtime.metric_names import FEDERATED, canonical_records
from plait.web import JsonlTail, StatusBoard, finite, serve_page, settings_table

# Per-round figures the charts draw, under their canonical names (metric_names.py).
SERIES_KEYS = ("round", "elapsed_s", "test_accuracy", "test_loss", "train_loss", "fed_accuracy", "epsilon",
               "cumulative_bytes_up", "cumulative_bytes_down", "selected", "participants", "dropped", "refused")
# status.json's `history`, kept for readers of the page's first version: a few of the series' keys per round.
HISTORY_KEYS = ("round", "test_accuracy", "test_loss", "participants", "dropped")
MAX_CLIENT_ROWS = 500  # the table lists this many clients (those with refusals first); the counts cover them all


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DashboardFeed:
    """What the dashboard shows beyond the round loop's own snapshot: the per-round series (read from the run's
    metrics.jsonl as it grows), one row per client, the deadline countdown, the settings, elapsed time and ETA."""

    def __init__(self, config: Any) -> None:
        self.metrics = JsonlTail(Path(config.run.root) / config.run.name / "metrics.jsonl")
        self.settings = settings_table(config)
        self.net, self.rounds = config.net, config.fl.rounds
        privacy = config.fl.privacy
        dp = privacy.mode != "none" and privacy.noise_multiplier > 0
        self.budget, self.delta = (privacy.epsilon_budget or None, privacy.delta) if dp else (None, None)
        self.started = time.time()
        self._records: list[dict[str, Any]] = []
        self._series: list[dict[str, Any]] = []
        self._round_seen: tuple[int, int, float] | None = None  # (id of the open round, its index, when first seen)

    def series(self) -> list[dict[str, Any]]:
        """The run's records so far: the lines appended since the last call are read (the whole file again when a
        resume replaced it); a line still being written waits for the next call."""
        new, restarted = self.metrics.read()
        if restarted:
            self._records = []
        elif not new:
            return self._series
        self._records += new
        records = canonical_records(self._records, FEDERATED)
        self._series = [{k: finite(r[k]) for k in SERIES_KEYS if k in r} for r in records if "round" in r]
        return self._series

    def deadline_s(self, rnd: Any, now: float) -> float | None:
        """Seconds left before the open round's deadline (counted from when this feed first saw the round, within
        the 0.25 s between snapshots; a secure-aggregation stage starts its own)."""
        if rnd is None or rnd.closed:
            return None
        if self._round_seen is None or self._round_seen[:2] != (id(rnd), rnd.idx):
            self._round_seen = (id(rnd), rnd.idx, now)
        return max(self.net.round_timeout_s - (now - self._round_seen[2]), 0.0)

    def client_rows(self, clients: dict[int, Any], rnd: Any, now: float) -> list[dict[str, Any]]:
        horizon = now - self.net.heartbeat_timeout_s
        # refused clients first, then by id; nsmallest: a federation of many thousand clients is not sorted 4× a second
        order = heapq.nsmallest(MAX_CLIENT_ROWS, clients, key=lambda cid: (not clients[cid].refusals, cid))
        rows = []
        for cid in order:
            info = clients[cid]
            rows.append({"id": cid, "connected": info.last_seen >= horizon, "last_seen_s": now - info.last_seen,
                         "examples": info.num_examples, "properties": dict(info.properties),
                         "rounds": info.rounds, "evaluations": info.evaluations, "refusals": dict(info.refusals),
                         "last_refusal": info.last_refusal, "this_round": _in_round(rnd, cid)})
        return rows

    def fields(self, server: Any) -> dict[str, Any]:
        now, series = time.monotonic(), self.series()
        done = series[-1]["round"] if series else 0
        run_s = series[-1].get("elapsed_s") if series else None
        eta_s = run_s / done * (self.rounds - done) if run_s and done else None  # mean round time × rounds left
        return {"series": series, "clients": self.client_rows(server.clients, server.round, now),
                "deadline_s": self.deadline_s(server.round, now), "settings": self.settings,
                "started": self.started, "elapsed_s": time.time() - self.started, "run_s": run_s, "eta_s": eta_s,
                "epsilon_budget": self.budget, "delta": self.delta}


def _in_round(rnd: Any, cid: int) -> str:
    if rnd is None or cid not in rnd.task_ids:
        return ""
    if cid in rnd.refused:
        return f"refused ({rnd.refused[cid]})"
    if cid in rnd.reported:
        return "reported"
    return "dropped" if cid in rnd.gone else "selected"


# The page and its script ship as package files (no build step, nothing fetched from the internet).
PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
SCRIPT = (Path(__file__).parent / "dashboard.js").read_text(encoding="utf-8")


def serve_status(board: StatusBoard, host: str, port: int, connections: int = 32,
                 timeout_s: float = 5.0) -> ThreadingHTTPServer:
    """Start the page in a daemon thread; the returned server's `server_address` has the bound port. A request
    must arrive within `timeout_s`, and at most `connections` are served at once."""
    return serve_page(board, PAGE, SCRIPT, host, port, connections, timeout_s)
