"""What the live dashboards share: a bounded, read-only HTTP server for one page (`serve.py`), a reader of JSONL
logs as they grow (`tail.py`), JSON-safe values and settings (`values.py`), and the page assets: `charts.js` (SVG
line charts, fact boxes, tables, the polling loop) and `dashboard.css`.

The federated server's page (plait/federated/net/status.py) and the parameter-server launcher's
(plait/ps/dashboard.py) are each one HTML frame and one script of their own on top of these. Bottom layer: it
imports nothing above plait/settings and plait/runtime, so every plane may use it.
"""

from plait.web.serve import StatusBoard, serve_page
from plait.web.tail import JsonlTail
from plait.web.values import finite, settings_table

__all__ = ["JsonlTail", "StatusBoard", "finite", "serve_page", "settings_table"]
