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
from plait.ps.journal import PREFIX_BYTES, Journal
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


def _records(journal: Journal) -> list[tuple[int, list[float]]]:
    return [(h.req, np.frombuffer(p, np.float32).tolist()) for h, p in journal.records()]


def test_after_a_checkpoint_the_journal_writes_over_its_old_records_and_reads_back_only_the_new(tmp_path):
    """The file's pages are reused (no truncation): records after a checkpoint go at its start, and what the old
    ones leave after them is not read back: not a longer older record, not one cut at a record's boundary."""
    journal = Journal(tmp_path / "s.journal", fresh=True)
    for value in (1.0, 2.0, 3.0):
        journal.append(Header(Op.REPLICATE, extra=3, numel=8), np.full(8, value, np.float32))
    size = (tmp_path / "s.journal").stat().st_size
    journal.checkpointed(journal.seq)  # a checkpoint holds records 1-3
    journal.append(Header(Op.REPLICATE, extra=3, numel=2), np.full(2, 4.0, np.float32))  # shorter than record 1
    journal.append(Header(Op.REPLICATE, extra=3, numel=8), np.full(8, 5.0, np.float32))
    assert (tmp_path / "s.journal").stat().st_size == size  # written over, not appended
    assert _records(Journal(tmp_path / "s.journal", fresh=False)) == [(4, [4.0] * 2), (5, [5.0] * 8)]
    journal.checkpointed(journal.seq)
    journal.append(Header(Op.REPLICATE, extra=3, numel=2), np.full(2, 6.0, np.float32))  # ends where record 5 did
    journal.close()
    # record 5 still follows record 6's end, on a record boundary: its number is not 7, so it is not read
    assert _records(Journal(tmp_path / "s.journal", fresh=False)) == [(6, [6.0] * 2)]


def test_a_kill_during_a_record_leaves_nothing_that_reads_as_it(tmp_path):
    """A record's payload is written before its prefix: a kill during the payload leaves the old record's prefix
    (a number the checkpoint holds), and a prefix cut short fails its CRC."""
    journal = Journal(tmp_path / "s.journal", fresh=True)
    for value in (1.0, 2.0):
        journal.append(Header(Op.REPLICATE, extra=3, numel=4), np.full(4, value, np.float32))
    journal.close()
    data = bytearray((tmp_path / "s.journal").read_bytes())
    # a new record 3 over record 1 after a checkpoint of 1-2, killed after its payload: record 1's prefix, new bytes
    data[PREFIX_BYTES: PREFIX_BYTES + 16] = np.full(4, 9.0, np.float32).tobytes()
    (tmp_path / "s.journal").write_bytes(bytes(data))
    assert [req for req, _ in _records(Journal(tmp_path / "s.journal", fresh=False))] == [1, 2]  # both <= 2: skipped
    torn = bytearray(data)
    torn[PREFIX_BYTES + 16 + 20: PREFIX_BYTES + 16 + 28] = b"\xff" * 8  # record 2's prefix half written
    (tmp_path / "s.journal").write_bytes(bytes(torn))
    assert [req for req, _ in _records(Journal(tmp_path / "s.journal", fresh=False))] == [1]


def _restart(tmp_path, endpoint: str, consistency: str = "bsp", num_workers: int = 2,
             checkpoint_every: int = 0) -> mp.Process:
    """Server 0 again, on its endpoint, resuming from what it left (SGD lr 1; by default BSP, 2 workers, no
    periodic checkpoint)."""
    config = ServerConfig(index=0, endpoint=endpoint, num_workers=num_workers,
                          consistency=Consistency.from_setting(consistency),
                          optimizer=OptimizerConfig(name="sgd", lr=1.0), checkpoint_every=checkpoint_every,
                          state_dir=str(tmp_path), resume=True)
    proc = mp.get_context("spawn").Process(target=run_server, args=(config,), daemon=True)
    proc.start()
    return proc


def _kill_and_restart(tmp_path, server: mp.Process, endpoint: str, **settings) -> mp.Process:
    os.kill(server.pid, signal.SIGKILL)
    server.join(timeout=30)
    (tmp_path / "server-0.endpoint").unlink()
    restarted = _restart(tmp_path, endpoint, **settings)
    deadline = time.monotonic() + 60
    while not (tmp_path / "server-0.endpoint").exists():
        assert time.monotonic() < deadline, "the server did not come back"
        time.sleep(0.05)
    return restarted


def _seeded_worker(endpoints: list[str], rank: int) -> KVStore:
    """Key 0 (4 zeros) created by the seeder, then worker `rank` joined to it."""
    seeder = KVStore(endpoints, -1, timeout_s=20.0)
    seeder.init(0, np.zeros(4, np.float32))
    seeder.close(goodbye=False)
    worker = KVStore(endpoints, rank, retry_s=0.3, timeout_s=30.0)
    worker.init(0, np.zeros(4, np.float32))
    return worker


def test_a_push_after_a_restart_from_a_checkpoint_survives_the_next_kill(tmp_path):
    """Killed right after a checkpoint, a server comes back with no journal record beyond it; the push it then
    acknowledges must be numbered after the checkpoint's records. Numbered from 1 again, it was taken for one the
    checkpoint held and skipped when a second kill replayed the journal: an acknowledged push lost."""
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, checkpoint_every=1)
    procs = list(servers)
    try:
        worker = _seeded_worker(endpoints, 0)
        worker.wait(worker.push(0, np.full(4, -1.0, np.float32)))  # applied (1.0), then a checkpoint
        deadline = time.monotonic() + 30
        while "checkpoint" not in [e["event"] for e in read_metrics(tmp_path / "server-0.jsonl")]:
            assert time.monotonic() < deadline, "no checkpoint after the first update"
            time.sleep(0.05)
        procs.append(_kill_and_restart(tmp_path, procs[-1], endpoints[0], consistency="asp", num_workers=1))
        worker.wait(worker.push(0, np.full(4, -1.0, np.float32)))  # acknowledged: only in the journal (2.0)
        procs.append(_kill_and_restart(tmp_path, procs[-1], endpoints[0], consistency="asp", num_workers=1))
        weights = np.zeros(4, np.float32)
        worker.wait(worker.pull(0, weights))
        np.testing.assert_array_equal(weights, np.full(4, 2.0, np.float32))  # both pushes: nothing lost
        worker.close()
    finally:
        for proc in procs:
            proc.kill()


def test_a_clock_whose_last_push_is_journaled_without_its_completion_is_completed_at_the_replay(tmp_path):
    """Killed between a BSP clock's last push (journaled, acknowledged) and the record of its completion, a server
    replays both pushes: it must apply the clock's mean then, or a pull at that clock, ready by the clocks alone,
    gets the weights without it (seen as a run ending off single-process SGD)."""
    from plait.ps.replication import Change

    journal = Journal(tmp_path / "server-0.journal", fresh=True)
    piece = dict(key=0, offset=0, numel=4)
    journal.append(Header(Op.REPLICATE, extra=Change.INIT, worker=-1, **piece), np.zeros(4, np.float32))
    for worker, value in ((0, -2.0), (1, -4.0)):  # clock 0 of both workers; no COMPLETE after them
        journal.append(Header(Op.REPLICATE, extra=Change.PUSH, worker=worker, clock=0, **piece),
                       np.full(4, value, np.float32))
    journal.close()
    server = _restart(tmp_path, "tcp://127.0.0.1:0")  # BSP, 2 workers, SGD lr 1, resuming from the journal
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "server-0.endpoint").exists():
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        worker = KVStore([(tmp_path / "server-0.endpoint").read_text()], 0, retry_s=0.3, timeout_s=30.0)
        weights = np.zeros(4, np.float32)
        worker.init(0, weights)
        assert worker.clock(0) == 0  # the server holds its push of clock 0
        worker.wait(worker.pull(0, weights))
        np.testing.assert_array_equal(weights, np.full(4, 3.0, np.float32))  # 0 - 1 * mean(-2, -4)
        worker.close()
    finally:
        server.kill()


def test_pieces_and_a_pending_bsp_push_survive_a_kill_before_any_checkpoint(tmp_path):
    """Worker 0's push of clock 0 is acknowledged while worker 1's is still missing; the server is killed (no
    checkpoint written yet) and restarted: it holds the piece and worker 0's gradient, so worker 1's push completes
    the clock with both (before: the piece was gone)."""
    servers, endpoints = start_servers(tmp_path, 1, "bsp", num_workers=2)  # checkpoint_every = 0: none until the end
    restarted = None
    try:
        first = _seeded_worker(endpoints, 0)
        first.wait(first.push(0, np.full(4, -2.0, np.float32)))  # acknowledged: BSP holds it in the clock's sum
        assert not (tmp_path / "server-0.npz").exists()
        restarted = _kill_and_restart(tmp_path, servers[0], endpoints[0])
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
    # the servers' last checkpoints hold everything: their journals' files are given back (kept between checkpoints)
    journals = list((tmp_path / "early" / "servers").glob("server-*.journal"))
    assert len(journals) == 2 and all(path.stat().st_size == 0 for path in journals)


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
