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

from plait.experiment.metric_names import FEDERATED, canonical_records

# Per-round figures the charts draw, under their canonical names (metric_names.py).
SERIES_KEYS = ("round", "elapsed_s", "test_accuracy", "test_loss", "train_loss", "fed_accuracy", "epsilon",
               "cumulative_bytes_up", "cumulative_bytes_down", "selected", "participants", "dropped", "refused")
MAX_CLIENT_ROWS = 500  # the table lists this many clients (those with refusals first); the counts cover them all


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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>plait fl: {run}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 16px 0 6px; }
.bar { display: flex; flex-wrap: wrap; gap: 18px; margin: 6px 0 10px; }
.fact b { display: block; font-size: 18px; } .fact { color: #555; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.card h3 { font-size: 13px; margin: 0 0 2px; } .legend span { margin-right: 10px; font-size: 12px; }
.card svg { width: 100%; height: auto; } svg text { font-size: 11px; fill: #444; }
svg .axis { stroke: #999; } svg .grid { stroke: #eee; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; } th { background: #f0f0f0; }
.ok { color: #2a7a2a; } .bad { color: #b22; } button.on { font-weight: bold; }
#error { color: #b22; }
</style></head>
<body>
<h1>plait federated server: <span id="run">{run}</span></h1>
<div id="phase" class="fact">loading /status.json ...</div><div id="error"></div>
<div class="bar">
 <div class="fact">rounds done<b id="rounds">-</b></div><div class="fact">clients connected<b id="connected">-</b></div>
 <div class="fact">elapsed<b id="elapsed">-</b></div><div class="fact">ETA<b id="eta">-</b></div>
 <div class="fact">server memory<b id="rss">-</b></div><div class="fact">updated<b id="updated">-</b></div>
</div>
<h2>Round in progress</h2><div class="bar" id="current"></div>
<h2>Charts <button id="x-round" class="on">against round</button> <button id="x-time">against time</button></h2>
<div class="charts">
 <div class="card"><h3>test accuracy (%)</h3><div class="legend" id="legend-accuracy"></div>
  <svg id="chart-accuracy" viewBox="0 0 440 230"></svg></div>
 <div class="card"><h3>loss</h3><div class="legend" id="legend-loss"></div>
  <svg id="chart-loss" viewBox="0 0 440 230"></svg></div>
 <div class="card"><h3>privacy spent: ε <span id="delta"></span></h3><div class="legend" id="legend-epsilon"></div>
  <svg id="chart-epsilon" viewBox="0 0 440 230"></svg></div>
 <div class="card"><h3>traffic so far (MB)</h3><div class="legend" id="legend-traffic"></div>
  <svg id="chart-traffic" viewBox="0 0 440 230"></svg></div>
</div>
<h2>Clients <span id="client-count"></span></h2>
<table id="clients"><thead><tr><th>client</th><th>connected</th><th>last seen</th><th>examples</th>
<th>rounds taken part in</th><th>evaluations</th><th>this round</th><th>refusals</th><th>last refusal</th>
<th>charging</th><th>idle</th><th>unmetered</th></tr></thead><tbody></tbody></table>
<h2>Refused requests by reason (since the server started)</h2>
<table id="refusals"><thead><tr><th>reason</th><th>count</th></tr></thead><tbody></tbody></table>
<details><summary><b>Run settings</b></summary><table id="settings"><tbody></tbody></table></details>
<p><a href="/status.json">status.json</a></p>
<script src="/dashboard.js"></script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
const SVG = "http://www.w3.org/2000/svg";
let xMode = "round", last = null;

function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
function duration(s) {
  if (num(s) === null) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + sec + " s";
}
function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  return node;
}
function ticks(lo, hi, count, integer) {
  if (hi <= lo) hi = lo + 1;
  let step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
  for (const f of [1, 2, 5, 10]) if ((hi - lo) / (step * f) <= count) { step *= f; break; }
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}
// lines: [{label, points: [[x, y], ...]}]; hlines: [{y, label}]
function chart(name, lines, hlines, xLabel, empty) {
  const svg = $("chart-" + name), W = 440, H = 230;  // the viewBox: drawn in these units, scaled to the card
  const L = 52, R = 10, T = 8, B = 34;
  svg.replaceChildren();
  const legend = $("legend-" + name);
  legend.replaceChildren();
  const xs = [], ys = [];
  lines.forEach((line) => line.points.forEach(([x, y]) => { xs.push(x); ys.push(y); }));
  hlines.forEach((h) => ys.push(h.y));
  if (!xs.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, empty || "no data yet"));
    return;
  }
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (xMode === "round") { x0 = Math.min(x0, 1); x1 = Math.max(x1, x0 + 1); }
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / ((x1 - x0) || 1) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of ticks(y0, y1, 5, false)) {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    svg.appendChild(el("text", {x: L - 4, y: sy(t) + 4, "text-anchor": "end"}, String(+t.toPrecision(4))));
  }
  for (const t of ticks(x0, x1, 6, xMode === "round")) {
    svg.appendChild(el("line", {x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "axis"}));
    svg.appendChild(el("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, String(t)));
  }
  svg.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, xLabel));
  hlines.forEach((h) => {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(h.y), y2: sy(h.y), stroke: "#d62728",
                                "stroke-dasharray": "5,4"}));
    svg.appendChild(el("text", {x: W - R - 4, y: sy(h.y) - 4, "text-anchor": "end"}, h.label));
  });
  lines.forEach((line, i) => {
    const color = COLORS[i % COLORS.length];
    const span = document.createElement("span");
    span.style.color = color; span.textContent = "● " + line.label;
    legend.appendChild(span);
    svg.appendChild(el("polyline", {points: line.points.map(([x, y]) => sx(x) + "," + sy(y)).join(" "),
                                    fill: "none", stroke: color, "stroke-width": 1.5}));
    if (line.points.length <= 300) line.points.forEach(([x, y]) => {
      const dot = el("circle", {cx: sx(x), cy: sy(y), r: 2.5, fill: color, class: "pt", "data-series": line.label,
                                "data-x": x});
      dot.appendChild(el("title", {}, line.label + ": " + (+y.toPrecision(5)) + " at " + xLabel + " " + x));
      svg.appendChild(dot);
    });
  });
}
function points(series, key, scale) {
  const out = [];
  for (const r of series) {
    const x = num(xMode === "round" ? r.round : r.elapsed_s), y = num(r[key]);
    if (x !== null && y !== null) out.push([x, y * scale]);
  }
  return out;
}
function lines(series, specs) {
  return specs.map(([label, key, scale]) => ({label, points: points(series, key, scale || 1)}))
              .filter((l) => l.points.length);
}
function fact(parent, label, value, cls) {
  const d = document.createElement("div"); d.className = "fact " + (cls || "");
  d.textContent = label; const b = document.createElement("b"); b.textContent = value; d.appendChild(b);
  parent.appendChild(d);
}
function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) {
    const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td);
  }
  tbody.appendChild(tr);
}
function render(s) {
  last = s;
  $("run").textContent = s.run; document.title = "plait fl: " + s.run;
  $("phase").textContent = "phase: " + s.phase;
  $("rounds").textContent = s.round + " / " + s.rounds;
  $("connected").textContent = s.connected + " of " + s.registered + " registered";
  $("elapsed").textContent = duration(s.elapsed_s);
  $("eta").textContent = s.phase === "done" ? "done" : duration(s.eta_s);
  $("rss").textContent = num(s.rss_mib) === null ? "-" : s.rss_mib.toFixed(0) + " MiB";
  $("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();
  const cur = $("current"); cur.replaceChildren();
  const c = s.current || {};
  if (c.round === undefined) fact(cur, "round", "none open");
  else {
    const refused = Object.keys(c.refused || {}).length;
    fact(cur, c.kind + " round", c.round + (c.closed ? " (closed)" : ""));
    fact(cur, "selected", c.selected.length + " (target " + c.target + ")");
    fact(cur, "reported", c.finished.length);
    fact(cur, "dropped", c.dropped.length - refused, c.dropped.length - refused ? "bad" : "");
    fact(cur, "refused", refused, refused ? "bad" : "");
    fact(cur, "deadline in", num(s.deadline_s) === null ? "-" : s.deadline_s.toFixed(0) + " s");
    if (c.secagg_stage) fact(cur, "secure aggregation", c.secagg_stage);
  }
  const series = s.series || [], xLabel = xMode === "round" ? "round" : "elapsed time (s)";
  chart("accuracy", lines(series, [["test", "test_accuracy", 100], ["federated", "fed_accuracy", 100]]), [], xLabel);
  chart("loss", lines(series, [["training", "train_loss"], ["test", "test_loss"]]), [], xLabel);
  $("delta").textContent = num(s.delta) === null ? "" : "(δ = " + s.delta + ")";
  chart("epsilon", lines(series, [["ε", "epsilon"]]),
        num(s.epsilon_budget) === null ? [] : [{y: s.epsilon_budget, label: "budget ε = " + s.epsilon_budget}],
        xLabel, num(s.delta) === null ? "no differential privacy in this run" : "no ε yet");
  chart("traffic", lines(series, [["uploaded", "cumulative_bytes_up", 1e-6],
                                  ["downloaded", "cumulative_bytes_down", 1e-6]]), [], xLabel);
  const clients = $("clients").tBodies[0]; clients.replaceChildren();
  for (const k of s.clients || []) {
    const refusals = Object.entries(k.refusals).map(([r, n]) => r + " × " + n).join(", ");
    const p = k.properties || {};
    row(clients, [[k.id], [k.connected ? "yes" : "no", k.connected ? "ok" : "bad"],
                  [k.last_seen_s.toFixed(1) + " s ago"], [k.examples], [k.rounds], [k.evaluations],
                  [k.this_round, k.this_round.startsWith("refused") ? "bad" : ""], [refusals, refusals ? "bad" : ""],
                  [k.last_refusal], [p.charging ? "yes" : "no"], [p.idle ? "yes" : "no"],
                  [p.unmetered ? "yes" : "no"]]);
  }
  $("client-count").textContent = "(" + (s.clients || []).length + " of " + s.registered + " shown)";
  const refusals = $("refusals").tBodies[0]; refusals.replaceChildren();
  for (const [reason, n] of Object.entries(s.rejected || {})) row(refusals, [[reason], [n, n ? "bad" : ""]]);
  const settings = $("settings").tBodies[0];
  if (!settings.rows.length) for (const [k, v] of Object.entries(s.settings || {})) row(settings, [[k], [String(v)]]);
}
async function refresh() {
  try {
    const reply = await fetch("/status.json", {cache: "no-store"});
    render(await reply.json());
    $("error").textContent = "";
  } catch (err) {
    $("error").textContent = "status unavailable (server stopped?): " + err;
  }
  setTimeout(refresh, 1000);
}
function axis(mode) {
  xMode = mode;
  $("x-round").className = mode === "round" ? "on" : ""; $("x-time").className = mode === "time" ? "on" : "";
  if (last) render(last);
}
$("x-round").addEventListener("click", () => axis("round"));
$("x-time").addEventListener("click", () => axis("time"));
refresh();
"""

# This origin only: the page loads nothing from the internet and sends nothing anywhere but back here.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def serve_status(board: StatusBoard, host: str, port: int) -> ThreadingHTTPServer:
    """Start the page in a daemon thread; the returned server's `server_address` has the bound port."""
    class Handler(BaseHTTPRequestHandler):
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

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="plait-status", daemon=True).start()
    return httpd
