"""A parameter server killed before its first checkpoint (issue 16): before, it came back without its pieces and the
run went on from nothing; and a checkpoint dropped the pending BSP sums, so pushes acknowledged for a clock not yet
complete were lost on a restart. Now every change is on disk (checkpoint or journal) before it is acknowledged.
Real server processes killed with SIGKILL, on 127.0.0.1, bounded waits."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
from test_ps_cluster import make_config, single_process_sgd
from test_ps_consistency import start_servers

from plait.experiment.runs.parameter_server import run_ps
from plait.ps.consistency import Consistency
from plait.ps.journal import Journal
from plait.ps.kvstore import KVStore
from plait.ps.optim import OptimizerConfig
from plait.ps.server import run_server
from plait.ps.server_config import ServerConfig
from plait.ps.wire import Header, Op
from plait.runtime.metrics_log import read_metrics


def test_a_record_cut_short_by_a_kill_is_not_replayed(tmp_path):
    journal = Journal(tmp_path / "s.journal", fresh=True)
    journal.append(Header(Op.REPLICATE, extra=3, numel=4, clock=0), np.ones(4, np.float32))
    journal.append(Header(Op.REPLICATE, extra=3, numel=4, clock=1), np.full(4, 2.0, np.float32))
    journal.close()
    data = (tmp_path / "s.journal").read_bytes()
    (tmp_path / "s.journal").write_bytes(data[:-3])  # the second record's write was interrupted
    again = Journal(tmp_path / "s.journal", fresh=False)
    records = list(again.records())
    assert [(h.req, h.clock) for h, _ in records] == [(1, 0)]
    assert np.frombuffer(records[0][1], np.float32).tolist() == [1.0] * 4
    assert not Journal(tmp_path / "s.journal", fresh=True).path.exists()  # a fresh start forgets it


def _restart(tmp_path, endpoint: str) -> mp.Process:
    """Server 0 again, on its endpoint, resuming from what it left (BSP, 2 workers, SGD lr 1, no periodic
    checkpoint)."""
    config = ServerConfig(index=0, endpoint=endpoint, num_workers=2, consistency=Consistency.from_setting("bsp"),
                          optimizer=OptimizerConfig(name="sgd", lr=1.0), checkpoint_every=0,
                          state_dir=str(tmp_path), resume=True)
    proc = mp.get_context("spawn").Process(target=run_server, args=(config,), daemon=True)
    proc.start()
    return proc


def test_pieces_and_a_pending_bsp_push_survive_a_kill_before_any_checkpoint(tmp_path):
    """Worker 0's push of clock 0 is acknowledged while worker 1's is still missing; the server is killed (no
    checkpoint written yet) and restarted: it holds the piece and worker 0's gradient, so worker 1's push completes
    the clock with both (before: the piece was gone)."""
    servers, endpoints = start_servers(tmp_path, 1, "bsp", num_workers=2)  # checkpoint_every = 0: none until the end
    restarted = None
    try:
        seeder = KVStore(endpoints, -1, timeout_s=20.0)
        seeder.init(0, np.zeros(4, np.float32))
        seeder.close(goodbye=False)
        first = KVStore(endpoints, 0, retry_s=0.3, timeout_s=30.0)
        first.init(0, np.zeros(4, np.float32))
        first.wait(first.push(0, np.full(4, -2.0, np.float32)))  # acknowledged: BSP holds it in the clock's sum
        assert not (tmp_path / "server-0.npz").exists()
        os.kill(servers[0].pid, signal.SIGKILL)
        servers[0].join(timeout=30)
        (tmp_path / "server-0.endpoint").unlink()
        restarted = _restart(tmp_path, endpoints[0])
        deadline = time.monotonic() + 60
        while not (tmp_path / "server-0.endpoint").exists():
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.05)
        second = KVStore(endpoints, 1, retry_s=0.3, timeout_s=30.0)
        second.init(0, np.zeros(4, np.float32))
        assert second.clock(0) == -1
        weights = np.zeros(4, np.float32)
        second.wait(second.pushpull(0, np.full(4, -4.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(4, 3.0, np.float32))  # 0 - 1 * mean(-2, -4): nothing lost
        for kv in (first, second):
            kv.close()
    finally:
        for proc in [*servers, *([restarted] if restarted else [])]:
            proc.kill()
    events = [e["event"] for e in read_metrics(tmp_path / "server-0.jsonl")]
    assert "replayed" in events and "restored" not in events  # from the journal: there was no checkpoint


def test_a_run_whose_server_is_killed_before_its_first_checkpoint_ends_as_single_process_sgd(tmp_path):
    """`plait train` with SIGKILL of server 1 mid-run (sync.checkpoint_every above the run's length: no periodic
    checkpoint): the launcher restarts it, it replays its journal, and the run ends on single-process SGD's weights,
    both workers going on without a restart."""
    config = make_config(tmp_path, "early", sync={"servers": 2, "consistency": "bsp", "checkpoint_every": 1000,
                                                  "retry_s": 0.3, "piece_numel": 40_000},
                         train={"steps": 60, "eval_every_s": 0.1}, fault={"kill_server": 1, "kill_at_step": 5})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    events = read_metrics(tmp_path / "early" / "metrics.jsonl")
    assert [e["server"] for e in events if e.get("event") == "server_killed"] == [1]
    assert summary.server_restarts == 1 and summary.failed_workers == []
    server_log = [e["event"] for e in read_metrics(tmp_path / "early" / "servers" / "server-1.jsonl")]
    assert server_log.count("listening") == 2
    # The restarted process came back with its state before it listened again: the journal replayed (after the
    # compaction checkpoint a long journal gets, when the kill lands late on a busy machine)
    again = [i for i, event in enumerate(server_log) if event == "listening"][1]
    assert "replayed" in server_log[:again] or "restored" in server_log[:again], server_log
    for rank in range(2):
        assert [r["step"] for r in read_metrics(tmp_path / "early" / f"worker-{rank}.jsonl")] == list(range(60))
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)


def test_resume_goes_on_from_journals_when_no_server_checkpointed(tmp_path):
    from plait.ps.launcher import SERVERS_DIR, server_checkpoints

    servers = tmp_path / SERVERS_DIR
    servers.mkdir()
    (servers / "server-0.journal").write_bytes(b"\x00" * 16)
    (servers / "server-1.journal").write_bytes(b"")  # opened, nothing acknowledged: no state to resume
    assert server_checkpoints(tmp_path) == []
    assert server_checkpoints(tmp_path, journals=True) == [servers / "server-0.journal"]


def test_without_the_journal_a_server_killed_early_comes_back_with_its_pieces(tmp_path):
    """sync.journal = false trades the acknowledged pushes since the last checkpoint for push throughput; the pieces
    themselves are checkpointed at the first update, so a server killed before any periodic checkpoint restarts
    with them (not empty) and the run ends, its weights finite."""
    config = make_config(tmp_path, "nojournal", sync={"servers": 2, "consistency": "bsp", "checkpoint_every": 1000,
                                                      "retry_s": 0.3, "piece_numel": 40_000, "journal": False},
                         train={"steps": 60, "eval_every_s": 0.1}, fault={"kill_server": 1, "kill_at_step": 5})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    assert summary.server_restarts == 1 and summary.failed_workers == []
    server_log = [e["event"] for e in read_metrics(tmp_path / "nojournal" / "servers" / "server-1.jsonl")]
    first_listening_again = [i for i, e in enumerate(server_log) if e == "listening"][1]
    assert "checkpoint" in server_log[:first_listening_again] and "restored" in server_log[first_listening_again - 2:]
    assert not (tmp_path / "nojournal" / "servers" / "server-1.journal").exists()
    assert np.isfinite(summary.weights).all()
