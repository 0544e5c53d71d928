"""Headless Chromium for the dashboard tests (Debian's chromium; the tests that need it skip where it is absent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, profile: Path, *extra: str, timeout: float = 90) -> str:
    """Headless chromium on `url`, with 5 s of virtual time for the page's script to poll and draw."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout


def svg_chart(dom: str, name: str) -> str:
    """The markup of the page's <svg id="chart-NAME"> in a dumped DOM."""
    return dom.split(f'id="chart-{name}"')[1].split("</svg>")[0]
