"""A read-only HTTP status page on a local port: `/` (HTML, refreshes itself) and `/status.json`.

The round loop publishes a fresh snapshot dict after every change; the HTTP thread only reads the latest one, so
the page never blocks training and never sees half an update.
"""

from __future__ import annotations

import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StatusBoard:
    def __init__(self) -> None:
        self._snapshot: dict[str, Any] = {}

    def publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot  # one reference swap: readers see the old or the new dict, whole

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot


def render_html(s: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{r.get('round')}</td><td>{_fmt(r.get('accuracy'))}</td><td>{_fmt(r.get('loss'))}</td>"
        f"<td>{r.get('participants')}</td><td>{r.get('dropped')}</td></tr>" for r in s.get("history", [])[-50:])
    current = s.get("current", {})
    facts = {"phase": s.get("phase"), "finished rounds": f"{s.get('round')} / {s.get('rounds')}",
             "connected clients": s.get("connected"), "current round": current.get("round"),
             "selected": current.get("selected"), "finished": current.get("finished"),
             "dropped": current.get("dropped"), "rejected requests": s.get("rejected"),
             "server memory (MiB)": _fmt(s.get("rss_mib"))}
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
            f"<title>plait fl: {html.escape(str(s.get('run')))}</title></head><body>"
            f"<h1>plait federated server: {html.escape(str(s.get('run')))}</h1><table>{items}</table>"
            f"<h2>accuracy by round</h2><table><tr><th>round</th><th>accuracy</th><th>loss</th>"
            f"<th>participants</th><th>dropped</th></tr>{rows}</table>"
            f"<p><a href='/status.json'>status.json</a></p></body></html>")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def serve_status(board: StatusBoard, host: str, port: int) -> ThreadingHTTPServer:
    """Start the page in a daemon thread; the returned server's `server_address` has the bound port."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name for it
            snapshot = board.snapshot()
            if self.path.split("?")[0] == "/status.json":
                body, kind = json.dumps(snapshot).encode(), "application/json"
            elif self.path.split("?")[0] == "/":
                body, kind = render_html(snapshot).encode(), "text/html; charset=utf-8"
            else:
                self.send_error(404, "only / and /status.json")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # keep the server's output for the round log

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="plait-status", daemon=True).start()
    return httpd
