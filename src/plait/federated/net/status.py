"""The FL server's live dashboard on a local, read-only HTTP port: `/` (the page), `/dashboard.js` (its script) and
`/status.json` (what the page polls every second).

The page is one HTML file and one hand-written script shipped here: no build step, nothing fetched from the
internet (the Content-Security-Policy allows this origin only). The script draws its charts as SVG: test accuracy,
loss, ε and cumulative MB against the round or elapsed time; then the round in progress (selected, reported,
dropped, refused, the deadline), a table of clients, refusal counters by reason, the run's settings, elapsed time
and ETA.

The round loop publishes a fresh snapshot dict after every change; the HTTP thread only reads the latest one, so the
page never blocks training and never sees half an update. Only GET is served (any other method: 501), and the port
binds 127.0.0.1 unless net.status_host says otherwise.
"""

from __future__ import annotations

import heapq
import html
import json
import math
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from plait.runtime.metric_names import FEDERATED, canonical_records

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


class StatusBoard:
    def __init__(self) -> None:
        self._snapshot: dict[str, Any] = {}

    def publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot  # one reference swap: readers see the old or the new dict, whole

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot


class DashboardFeed:
    """What the dashboard shows beyond the round loop's own snapshot: the per-round series (read from the run's
    metrics.jsonl as it grows), one row per client, the deadline countdown, the settings, elapsed time and ETA."""

    def __init__(self, config: Any) -> None:
        self.metrics_path = Path(config.run.root) / config.run.name / "metrics.jsonl"
        self.settings = {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                         for k, v in _flatten(asdict(config)).items()}
        self.net, self.rounds = config.net, config.fl.rounds
        privacy = config.fl.privacy
        dp = privacy.mode != "none" and privacy.noise_multiplier > 0
        self.budget, self.delta = (privacy.epsilon_budget or None, privacy.delta) if dp else (None, None)
        self.started = time.time()
        self._inode, self._offset = -1, 0            # metrics.jsonl read up to this byte (complete lines)
        self._records: list[dict[str, Any]] = []
        self._series: list[dict[str, Any]] = []
        self._round_seen: tuple[int, int, float] | None = None  # (id of the open round, its index, when first seen)

    def series(self) -> list[dict[str, Any]]:
        """The run's records so far: the lines appended since the last call are read (the whole file again when a
        resume replaced it); a line still being written waits for the next call."""
        try:
            stat = self.metrics_path.stat()
        except OSError:
            return self._series
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode, self._offset, self._records = stat.st_ino, 0, []
        if stat.st_size == self._offset:
            return self._series
        with open(self.metrics_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(stat.st_size - self._offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                self._records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # not a record (the driver writes whole lines; a crash may cut the last one)
        records = canonical_records(self._records, FEDERATED)
        self._series = [{k: _finite(r[k]) for k in SERIES_KEYS if k in r} for r in records if "round" in r]
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


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def render_html(s: dict[str, Any]) -> str:
    """The page's frame; the script fills it from /status.json (the run name is here for a browser without it)."""
    run = html.escape(str(s.get("run", "")))
    return PAGE.replace("{run}", run)


# The page and its script ship as package files (no build step, nothing fetched from the internet).
PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
SCRIPT = (Path(__file__).parent / "dashboard.js").read_text(encoding="utf-8")



# This origin only: the page loads nothing from the internet and sends nothing anywhere but back here.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _BoundedServer(ThreadingHTTPServer):
    """At most `limit` connections served at once (a thread each); more are closed at once and counted."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, limit: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(limit)
        self.turned_away = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.turned_away += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_status(board: StatusBoard, host: str, port: int, connections: int = 32,
                 timeout_s: float = 5.0) -> ThreadingHTTPServer:
    """Start the page in a daemon thread; the returned server's `server_address` has the bound port. A request
    must arrive within `timeout_s`, and at most `connections` are served at once."""
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socket timeout: a peer that opens a connection and sends nothing is cut
        def do_GET(self) -> None:  # http.server's name for it; no other method is served (501)
            path = self.path.split("?")[0]
            if path == "/status.json":
                body, kind = json.dumps(board.snapshot()).encode(), "application/json"
            elif path == "/":
                body, kind = render_html(board.snapshot()).encode(), "text/html; charset=utf-8"
            elif path == "/dashboard.js":
                body, kind = SCRIPT.encode(), "text/javascript; charset=utf-8"
            else:
                self.send_error(404, "only /, /dashboard.js and /status.json")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # keep the server's output for the round log

    httpd = _BoundedServer((host, port), Handler, connections)
    threading.Thread(target=httpd.serve_forever, name="plait-status", daemon=True).start()
    return httpd
