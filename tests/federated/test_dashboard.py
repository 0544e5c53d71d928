"""The FL server's live dashboard, with a real server, two honest client processes and a client whose update is
refused: /status.json carries the series, the client rows and the refusal; the page stays read-only; and in a real
headless browser (Debian's chromium, skipped where absent) the page loads, its charts draw a point for every round
so far, and the refused client appears in the client table.

PLAIT_DASHBOARD_SCREENSHOT=docs/dashboard.png also writes a screenshot of the page mid-run there."""

from __future__ import annotations

import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from plait.federated.net.connection import Connection, Task
from plait.federated.net.local import (
    cluster,
    fetch_status,
    read_records,
    small_config,
    wait_until,
    write_config,
)
from tests_browser import CHROMIUM, chromium

ROGUE = 2  # registers from this test and sends a NaN update: refused ("nonfinite")


def refuse_a_nan_update(address: str) -> None:
    rogue = Connection(address, ROGUE, None)
    session = rogue.register({"charging": True, "idle": True, "unmetered": True}, 5).session
    for _ in range(60):
        task = rogue.get_task(session, 2.0, 199_210)
        if isinstance(task, Task):
            break
    else:
        raise AssertionError("the rogue client got no task")
    nan = torch.zeros(task.params.numel())
    nan[0] = math.nan
    with pytest.raises(Exception, match="nonfinite"):
        rogue.push_update(session, task, nan, 5, 1.0)
    rogue.close()


@pytest.mark.timeout(240)
def test_the_dashboard_shows_rounds_clients_and_a_refusal(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=300, heartbeat_timeout_s=3.0,
                       wait_for_clients=2)  # the rogue stops beating after its refusal: the run goes on
    raw["fl"].update(fraction=1.0, min_clients=2, eval_every=1)
    # central DP, so that the ε chart has points and a budget line (far enough not to stop the run)
    raw["fl"]["strategy"] = {"name": "fedavg", "weighting": "uniform"}
    raw["fl"]["privacy"] = {"mode": "central", "clip_norm": 0.02, "noise_multiplier": 0.3, "delta": 1e-5,
                            "epsilon_budget": 400.0}
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    with cluster(path, tmp_path, run_dir, 2) as (_, info, _clients):
        refuse_a_nan_update(f"127.0.0.1:{info['port']}")
        port = info["status_port"]

        def three_rounds():  # on the page, which is republished a few times a second
            status = fetch_status("127.0.0.1", port)
            return status if sum(r.get("test_accuracy") is not None for r in status.get("series", [])) >= 3 else None

        status = wait_until(three_rounds, 120, interval=0.2, what="3 evaluated rounds on the status page")

        # status.json: the series under canonical names, one row per client, the refusal counted for the rogue
        rounds = [r["round"] for r in status["series"] if r.get("test_accuracy") is not None]
        assert len(rounds) >= 3 and rounds == sorted(rounds)
        assert all(r["cumulative_bytes_up"] > 0 for r in status["series"])
        history = {r["round"]: r for r in status["history"]}  # the older summary, under the same canonical names
        assert all(set(history[r]) == {"round", "test_accuracy", "test_loss", "participants", "dropped"} and
                   history[r]["test_accuracy"] is not None for r in rounds)
        rows = {row["id"]: row for row in status["clients"]}
        assert set(rows) == {0, 1, ROGUE} and rows[0]["connected"] and rows[0]["rounds"] >= 1
        assert rows[ROGUE]["refusals"] == {"nonfinite": 1} and rows[ROGUE]["last_refusal"].startswith("nonfinite:")
        assert status["rejected"]["nonfinite"] == 1 and status["settings"]["fl.rounds"] == 300
        assert status["eta_s"] > 0 and status["elapsed_s"] > 0

        # read-only: GET of three paths, nothing else; a policy that loads nothing from elsewhere
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
            page = reply.read().decode()
            policy = reply.headers["Content-Security-Policy"]
        assert "plait federated server" in page and "http" not in re.sub(r'href="/status.json"', "", page)
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        for method, url, code in [("POST", "/status.json", 501), ("PUT", "/", 501), ("GET", "/etc/passwd", 404)]:
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{url}", method=method,
                                                              data=b"x" if method != "GET" else None), timeout=5)
            assert err.value.code == code

        if CHROMIUM is None:
            pytest.skip("chromium is not installed (apt-get install chromium): browser part skipped")
        url = f"http://127.0.0.1:{port}/"
        so_far = {r["round"] for r in read_records(run_dir) if "test_accuracy" in r}
        dom = chromium(url, tmp_path / "profile", "--dump-dom")
        shot = os.environ.get("PLAIT_DASHBOARD_SCREENSHOT")
        if shot:
            chromium(url, tmp_path / "profile", f"--screenshot={Path(shot).resolve()}", "--window-size=1280,1500",
                     "--hide-scrollbars")

    accuracy = dom.split('id="chart-accuracy"')[1].split("</svg>")[0]
    drawn = {int(x) for x in re.findall(r'<circle[^>]*data-series="test"[^>]*data-x="(\d+)"', accuracy)}
    assert so_far <= drawn, (so_far, drawn)  # a point for every round evaluated before the page loaded
    for name in ("traffic", "epsilon", "loss"):
        assert "<circle" in dom.split(f'id="chart-{name}"')[1].split("</svg>")[0], name
    assert "budget ε = 400" in dom
    table = dom.split('id="clients"')[1].split("</table>")[0]
    rogue_row = re.search(rf"<tr><td>{ROGUE}</td>.*?</tr>", table)
    assert rogue_row and "nonfinite × 1" in rogue_row.group(0), table[:2000]
    assert "phase: " in dom and "no data yet" not in accuracy


def test_the_feed_reads_appended_rounds_waits_for_a_cut_line_and_rereads_after_a_resume(tmp_path):
    from plait.federated.net.config import NetworkRunConfig
    from plait.federated.net.round_state import ClientInfo
    from plait.federated.net.status import DashboardFeed
    from plait.settings.config import from_dict

    feed = DashboardFeed(from_dict(NetworkRunConfig, small_config(tmp_path, rounds=10, round_timeout_s=30.0)))
    path = tmp_path / "net" / "metrics.jsonl"
    path.parent.mkdir()
    assert feed.series() == []  # no file yet
    path.write_text('{"round": 1, "accuracy": 0.5, "bytes_up": 2000000, "elapsed_s": 2.0}\n{"round": 2, "acc')
    assert feed.series() == [{"round": 1, "elapsed_s": 2.0, "test_accuracy": 0.5, "cumulative_bytes_up": 2e6}]
    with open(path, "a") as f:  # the cut line is finished, another round follows
        f.write('uracy": 0.6, "bytes_up": 2000000, "elapsed_s": 4.0}\n{"round": oops}\n{"round": 3, "loss": NaN}\n')
    series = feed.series()
    assert [(r["round"], r.get("test_accuracy"), r.get("cumulative_bytes_up")) for r in series] == \
        [(1, 0.5, 2e6), (2, 0.6, 4e6), (3, None, None)]  # a line that is not JSON is skipped, not fatal
    assert series[2] == {"round": 3, "test_loss": None}  # NaN would make status.json invalid JSON
    fields = feed.fields(type("Server", (), {"clients": {}, "round": None})())
    assert fields["eta_s"] is None  # the last round logged no elapsed_s
    replaced = path.with_suffix(".new")  # a resume truncates by writing a new file over the old one
    replaced.write_text('{"round": 1, "accuracy": 0.4, "elapsed_s": 2.5}\n')
    replaced.replace(path)
    assert [r["test_accuracy"] for r in feed.series()] == [0.4]
    fields = feed.fields(type("Server", (), {"clients": {}, "round": None})())
    assert fields["eta_s"] == 2.5 * 9 and fields["deadline_s"] is None  # 2.5 s a round, 9 rounds left
    clients = {0: ClientInfo("s", {"charging": True}, 10, 0.0), 7: ClientInfo("t", {}, 5, 0.0, refusals={"shape": 2})}
    assert [row["id"] for row in feed.client_rows(clients, None, 1.0)] == [7, 0]  # refused clients first


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_before_any_round(tmp_path):
    import time

    from plait.federated.net.status import StatusBoard, serve_status

    board = StatusBoard()
    board.publish({"run": "fresh", "phase": "waiting for 3 clients", "round": 0, "rounds": 5, "connected": 1,
                   "registered": 1, "current": {}, "history": [], "rejected": {"shape": 0}, "rss_mib": 100.0,
                   "time": time.time(), "series": [], "clients": [], "deadline_s": None, "settings": {"fl.rounds": 5},
                   "elapsed_s": 1.0, "run_s": None, "eta_s": None, "epsilon_budget": None, "delta": None})
    httpd = serve_status(board, "127.0.0.1", 0)
    try:
        dom = chromium(f"http://127.0.0.1:{httpd.server_address[1]}/", tmp_path / "profile", "--dump-dom")
    finally:
        httpd.shutdown()
    assert "phase: waiting for 3 clients" in dom and '<div id="error"></div>' in dom  # rendered, no script error
    assert "no data yet" in dom.split('id="chart-accuracy"')[1].split("</svg>")[0]
    assert "no differential privacy in this run" in dom and "none open" in dom
