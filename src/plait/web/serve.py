"""One dashboard page on a local, read-only HTTP port: `/` (the page's frame), `/dashboard.js` (its own script),
`/charts.js` and `/dashboard.css` (shared by every dashboard) and `/status.json` (what the page polls).

The process that owns the data publishes a fresh snapshot dict whenever it has one (`StatusBoard.publish`); the HTTP
threads only read the latest, so a page never blocks the work and never sees half an update. Only GET is served
(any other method: 501); at most `connections` requests are served at once (more are closed at once) and a request
must arrive within `timeout_s`. Nothing is fetched from the internet: the Content-Security-Policy allows this
origin only.
"""

from __future__ import annotations

import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
# The shared assets ship as package files (no build step).
SHARED = {"/charts.js": ((HERE / "charts.js").read_bytes(), "text/javascript; charset=utf-8"),
          "/dashboard.css": ((HERE / "dashboard.css").read_bytes(), "text/css; charset=utf-8")}

# This origin only: the page loads nothing from the internet and sends nothing anywhere but back here.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class StatusBoard:
    def __init__(self) -> None:
        self._snapshot: dict[str, Any] = {}

    def publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot  # one reference swap: readers see the old or the new dict, whole

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot


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


def serve_page(board: StatusBoard, page: str, script: str, host: str, port: int, connections: int = 32,
               timeout_s: float = 5.0) -> ThreadingHTTPServer:
    """Serve `page` (HTML; `{run}` becomes the snapshot's run name, escaped) with `script` at /dashboard.js, in a
    daemon thread; the returned server's `server_address` has the bound port, `shutdown()` stops it."""
    own_script = script.encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socket timeout: a peer that opens a connection and sends nothing is cut

        def do_GET(self) -> None:  # http.server's name for it; no other method is served (501)
            path = self.path.split("?")[0]
            if path == "/status.json":
                body, kind = json.dumps(board.snapshot()).encode(), "application/json"
            elif path == "/":
                run = html.escape(str(board.snapshot().get("run", "")))
                body, kind = page.replace("{run}", run).encode(), "text/html; charset=utf-8"
            elif path == "/dashboard.js":
                body, kind = own_script, "text/javascript; charset=utf-8"
            elif path in SHARED:
                body, kind = SHARED[path]
            else:
                self.send_error(404, "only /, /dashboard.js, /charts.js, /dashboard.css and /status.json")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # keep the owner's output for its own log

    httpd = _BoundedServer((host, port), Handler, connections)
    threading.Thread(target=httpd.serve_forever, name="plait-dashboard", daemon=True).start()
    return httpd
