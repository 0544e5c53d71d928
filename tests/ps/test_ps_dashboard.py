"""The parameter-server launcher's live dashboard (sync.status_port).

First the feed alone, on logs written here: what each worker's and server's log adds, a restarted worker's rewritten
log, the launcher's events. Then a real run (2 workers, one slowed, 2 servers, SSP(2), server 1 killed at step 8)
with the page up: its status.json over plain HTTP, the page in headless Chromium (skipped where chromium is absent:
its charts draw points, the worker clocks and the server's restart appear), and the page going away with the run.

PLAIT_PS_DASHBOARD_SCREENSHOT=docs/ps_dashboard.png also writes a screenshot of the page mid-run there."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from plait.federated.net.local import fetch_status, wait_until
from plait.ps.config import PSRunConfig
from plait.ps.dashboard import ClusterFeed, Processes
from plait.runtime.checkpoint import atomic_write_bytes
from plait.settings.config import from_dict
from tests_browser import CHROMIUM, chromium, svg_chart

STARTED = 1_000_000.0  # the feed's Unix time of elapsed_s = 0, in the tests on written logs


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def step(rank: int, clock: int, loss: float) -> dict:
    """A worker's line for `clock`, logged `clock` seconds into the run (worker 1 half a second later)."""
    return {"step": clock, "worker": rank, "train_loss": loss, "staleness": rank, "step_s": 0.25,
            "time": STARTED + clock + rank / 2}


def test_the_feed_follows_the_logs_the_processes_write(tmp_path):
    # Prepare: 2 workers, 2 servers under SSP(2); worker 0 logged clocks 0..5, worker 1 clocks 0..2
    config = from_dict(PSRunConfig, {"run": {"name": "feed", "root": str(tmp_path)}, "train": {"batch_size": 16},
                                     "sync": {"servers": 2, "consistency": "ssp:2"}})
    run = tmp_path / "feed"
    write_lines(run / "worker-0.jsonl", [step(0, c, 2.0 - c / 10) for c in range(6)])
    write_lines(run / "worker-1.jsonl", [step(1, c, 3.0) for c in range(3)])
    for index in range(2):
        write_lines(run / "servers" / f"server-{index}.jsonl", [
            {"event": "listening", "server": index, "time": STARTED, "pid": 10 + index},
            {"event": "stats", "server": index, "time": STARTED + 2, "keys": 1, "pieces": 3, "elements": 1000 + index,
             "updates": 9, "bytes_in": 4_000_000, "bytes_out": 2_000_000, "refused": 0}])
    feed = ClusterFeed(config, run, 2, STARTED)
    feed.note({"step": 3, "test_loss": 1.5, "test_accuracy": 0.6, "elapsed_s": 3.2, "time": STARTED + 3.2, "lr": 0.1})
    feed.note({"event": "server_killed", "server": 1, "step": 3, "time": STARTED + 3.5})
    running = Processes([True, True], [0, 0], [], [True, True], [0, 1])

    # Execute
    status = feed.snapshot("training", running, now=STARTED + 6.0)

    # Assert: clocks are the steps logged; the spread and the bound; each server's shard and work
    rows = status["worker_rows"]
    assert [(r["clock"], r["state"], r["train_loss"]) for r in rows] == [(6, "running", 1.5), (3, "running", 3.0)]
    assert status["clock_spread"] == 3 and status["slowest_clock"] == 3 and status["ssp_bound"] == 2
    assert status["spread"] == [{"elapsed_s": 6.0, "spread": 3}]
    # in the last 5 s (after 1.0 s): worker 0 logged clocks 2..5, worker 1 clocks 1 and 2 (at 1.5 s and 2.5 s)
    assert [r["samples_per_s"] for r in rows] == [4 * 16 / 5, 2 * 16 / 5]
    assert status["samples_per_s"] == pytest.approx(6 * 16 / 5)
    assert status["train"][:3] == [{"step": c + 1, "elapsed_s": c + 0.25, "train_loss": (2.0 - c / 10 + 3.0) / 2}
                                   for c in range(3)]
    assert status["train"][3] == {"step": 4, "elapsed_s": 3.0, "train_loss": 2.0 - 3 / 10}  # worker 0 alone now
    assert status["series"] == [{"step": 3, "elapsed_s": 3.2, "test_accuracy": 0.6, "test_loss": 1.5}]
    assert [(r["name"], r["pieces"], r["elements"], r["updates"], r["restarts"]) for r in status["server_rows"]] == \
        [("server-0", 3, 1000, 9, 0), ("server-1", 3, 1001, 9, 1)]
    assert [c["points"][-1] for c in status["clocks"]] == [[5.0, 6], [2.5, 3]]
    # 1 s bins from the second on (the workers started within the first): every later step counted
    assert [b["samples_per_s"] for b in status["throughput"]] == [2 * 16, 2 * 16, 1 * 16, 1 * 16, 1 * 16]
    events = [(e["source"], e["event"]) for e in status["events"]]
    assert events == [("server-0", "listening"), ("server-1", "listening"), ("launcher", "server_killed")]
    assert status["settings"]["sync.consistency"] == "ssp:2" and status["settings"]["workers"] == 2

    # A server drops worker 1; worker 0 dies and is restarted: its new life rewrote its log up to clock 3
    write_lines(run / "servers" / "server-0.jsonl",
                [{"event": "dropped", "server": 0, "worker": 1, "reason": "silent for 10.0 s", "time": STARTED + 7}])
    text = "".join(json.dumps(step(0, c, 2.0)) + "\n" for c in range(4)).encode()
    atomic_write_bytes(run / "worker-0.jsonl", lambda f: f.write(text))
    status = feed.snapshot("training", Processes([False, True], [1, 0], [], [True, True], [0, 1]), now=STARTED + 8)
    assert [(r["clock"], r["state"], r["restarts"]) for r in status["worker_rows"]] == \
        [(4, "restarting", 1), (3, "dropped", 0)]
    assert status["clock_spread"] is None  # neither counts: one restarting, one dropped
    assert status["events"][-1]["event"] == "dropped" and "worker 1" in status["events"][-1]["detail"]


def test_a_busy_port_is_an_error_naming_the_setting(tmp_path):
    from plait.ps.dashboard import Dashboard

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = from_dict(PSRunConfig, {"run": {"root": str(tmp_path)},
                                         "sync": {"status_port": taken.getsockname()[1]}})
        with pytest.raises(OSError, match="sync.status_host:sync.status_port"):
            Dashboard(config, tmp_path, 1, STARTED).serve()
    with pytest.raises(ValueError, match="sync.status_port"):
        from_dict(PSRunConfig, {"sync": {"status_port": 70000}})


# -- a real run with the page up ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A run in a thread with its page on a free port: worker 1 steps half as fast (0.5 s a step, 30 steps), so the
    page has a while to be read and SSP(2) holds worker 0 back; server 1 is killed once the slowest is at step 8."""
    from plait.experiment.runs.parameter_server import run_ps

    root = tmp_path_factory.mktemp("ps-dashboard")
    port = free_port()
    config = from_dict(PSRunConfig, {
        "run": {"name": "live", "root": str(root), "tensorboard": False}, "data": {"test_examples": 500},
        "train": {"steps": 30, "batch_size": 32, "eval_every_s": 0.5}, "optimizer": {"name": "adam", "lr": 0.003},
        "sync": {"servers": 2, "consistency": "ssp:2", "status_port": port, "checkpoint_every": 4, "retry_s": 0.3},
        "straggler": {"worker": 1, "factor": 2.0, "step_s": 0.25}, "fault": {"kill_server": 1, "kill_at_step": 8}})
    result: dict = {}

    def train() -> None:
        try:
            result["summary"] = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
        except BaseException as err:  # handed to the test that joins the run
            result["error"] = err

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    yield {"port": port, "root": root, "runner": runner, "result": result, "config": config}
    runner.join(timeout=240)


def evaluated_and_stepping(port: int, clock: int = 3, event: str | None = None):
    """The status once it has two evaluations, every worker is at `clock` or further, and `event` happened."""
    try:
        status = fetch_status("127.0.0.1", port)
    except (OSError, ValueError):
        return None  # the page is not up yet
    rows = status.get("worker_rows", [])
    ready = len(status.get("series", [])) >= 2 and rows and min(r["clock"] for r in rows) >= clock
    seen = event is None or event in {e["event"] for e in status.get("events", [])}
    return status if ready and seen else None


@pytest.mark.timeout(300)
def test_status_json_follows_a_live_run(live_run):
    port = live_run["port"]
    status = wait_until(lambda: evaluated_and_stepping(port, 5), 180, interval=0.2, what="evaluations and 5 steps")

    assert status["consistency"] == "ssp:2" and status["ssp_bound"] == 2 and status["phase"] == "training"
    assert [r["worker"] for r in status["worker_rows"]] == [0, 1]
    assert all(r["state"] == "running" and r["clock"] >= 5 for r in status["worker_rows"])
    assert status["samples_per_s"] > 0 and status["throughput"] and status["train"]
    assert all(0 <= point["spread"] <= 2 + 1 for point in status["spread"])  # SSP(2), +1 for a step in flight
    servers = status["server_rows"]
    assert [s["name"] for s in servers] == ["server-0", "server-1"] and all(s["running"] for s in servers)
    assert all(s["keys"] == 1 and s["pieces"] >= 1 and s["updates"] > 0 for s in servers)
    assert sum(s["elements"] for s in servers) == 199_210  # the 2NN's weights, split between the two
    assert [e["event"] for e in status["events"]].count("listening") == 2
    assert status["settings"]["sync.status_port"] == port and status["settings"]["workers"] == 2

    # the page and its assets, read-only, nothing fetched from elsewhere
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
        page = reply.read().decode()
        assert "default-src 'none'" in reply.headers["Content-Security-Policy"]
    assert 'plait parameter server: <span id="run">live</span>' in page
    assert "http" not in page.replace('href="/status.json"', "")
    for asset in ("/charts.js", "/dashboard.css", "/dashboard.js"):
        assert fetch_status("127.0.0.1", port, asset)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/status.json", method="POST",
                                                      data=b"x"), timeout=5)
    assert err.value.code == 501


@pytest.mark.timeout(300)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_draws_a_live_run_in_chromium(live_run, tmp_path):
    port = live_run["port"]
    wait_until(lambda: evaluated_and_stepping(port, 10, "server_restarted"), 180, interval=0.2,
               what="the killed server restarted, and 10 steps")
    url = f"http://127.0.0.1:{port}/"
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    shot = os.environ.get("PLAIT_PS_DASHBOARD_SCREENSHOT")
    if shot:
        chromium(url, tmp_path / "profile", f"--screenshot={Path(shot).resolve()}", "--window-size=1280,1700",
                 "--hide-scrollbars")

    assert '<div id="error"></div>' in dom and "phase: training" in dom  # rendered, no script error
    assert re.search(r'<circle[^>]*data-series="test"', svg_chart(dom, "accuracy"))
    loss = svg_chart(dom, "loss")
    assert "<circle" in loss and 'data-series="training (workers\' mean)"' in loss
    clocks = svg_chart(dom, "clocks")
    assert 'data-series="worker 0"' in clocks and 'data-series="worker 1"' in clocks
    assert "SSP bound 2" in svg_chart(dom, "spread") and "<polyline" in svg_chart(dom, "throughput")
    workers = dom.split('id="workers"')[1].split("</table>")[0]
    clock_cells = re.findall(r"<tr><td>(\d)</td><td>(\d+)</td>", workers)
    assert [w for w, _ in clock_cells] == ["0", "1"] and all(int(c) >= 3 for _, c in clock_cells)
    servers = dom.split('id="servers"')[1].split("</table>")[0]
    restarts = re.findall(r"<tr><td>(server-\d)</td>.*?<td[^>]*>(\d+)</td><td>[^<]*</td></tr>", servers)
    assert restarts == [("server-0", "0"), ("server-1", "1")], servers
    events = dom.split('id="events"')[1].split("</table>")[0]
    assert "server_killed" in events and "server_restarted" in events


@pytest.mark.timeout(300)
def test_the_page_goes_away_with_the_run(live_run):
    live_run["runner"].join(timeout=240)
    result = live_run["result"]
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.failed_workers == [] and summary.server_restarts == 1
    assert summary.final["step"] == live_run["config"].train.steps
    with pytest.raises(OSError):
        fetch_status("127.0.0.1", live_run["port"])
