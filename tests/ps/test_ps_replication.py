"""Replicated parameter servers (sync.replication = 2): every key range held by a primary and a backup process.
Real server and worker processes on 127.0.0.1, launched as `plait train` does; the launcher SIGKILLs every server
process in turn (fault.kill_every) at steps drawn from a seeded generator, and restarts each."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from test_ps_cluster import make_config, single_process_sgd

from plait.experiment.runs.parameter_server import run_ps
from plait.ps.checkpoint import ServerSnapshot, ShardState, load_shards, save_shards, snapshot_bytes
from plait.ps.config import PSRunConfig, SyncSection
from plait.ps.server_config import ServerConfig
from plait.ps.sharding import plan_shards
from plait.runtime.metrics_log import read_metrics

PIECE_NUMEL = 40_000   # 3 pieces per server for the 2NN's 199,210 weights on 2 servers


def test_replication_settings_name_the_setting():
    with pytest.raises(ValueError, match="sync.replication"):
        SyncSection(replication=3)
    with pytest.raises(ValueError, match="sync.failover_s"):
        SyncSection(failover_s=0)
    with pytest.raises(ValueError, match="sync.replication"):
        ServerConfig(index=0, endpoint="tcp://127.0.0.1:0", num_workers=1, replica=1)
    config = PSRunConfig()
    config.fault.kill_server, config.fault.kill_replica = 0, 1
    with pytest.raises(ValueError, match="fault.kill_replica"):
        config.check_workers(2)


def test_a_snapshot_and_a_checkpoint_carry_the_pending_bsp_sums(tmp_path):
    """The backup's catch-up and the checkpoint are one format, with the sums of clocks not yet complete (pushes
    acknowledged to their workers): a restored server without them would count those pushes as done, their
    gradients gone."""
    shard = ShardState(0, np.arange(4, dtype=np.float32), {"step": np.ones(1, np.int64)}, [3, 2])
    snapshot = ServerSnapshot({(0, 0): shard}, [1], 7, {(0, 0): {3: [np.full(4, 2, np.float32), 1]}}, 12)
    save_shards(tmp_path / "server-0.npz", snapshot)
    for restored in (load_shards(snapshot_bytes(snapshot)), load_shards(tmp_path / "server-0.npz")):
        np.testing.assert_array_equal(restored.shards[0, 0].param, shard.param)
        assert restored.shards[0, 0].clocks == [3, 2] and restored.finished == [1] and restored.updates == 7
        total, count = restored.sums[0, 0][3]
        np.testing.assert_array_equal(total, np.full(4, 2, np.float32))
        assert count == 1 and restored.journal_seq == 12


def kill_each_server_config(tmp_path, name, consistency, seed):
    """2 servers x 2 replicas; the first kill and the gap between kills drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    first, every = int(rng.integers(3, 8)), int(rng.integers(6, 10))
    # four kills, each after the previous one is back and caught up (failover_s, a restart, a sync), then steps with
    # everyone back: the tail must outlast the last recovery, or the run ends before the fourth kill
    steps = first + 3 * every + 30
    return make_config(tmp_path, name,
                       sync={"servers": 2, "replication": 2, "consistency": consistency, "failover_s": 0.5,
                             "retry_s": 0.2, "piece_numel": PIECE_NUMEL, "checkpoint_every": 5},
                       train={"steps": steps, "eval_every_s": 0.1}, straggler={"step_s": 0.04},
                       fault={"kill_server": int(rng.integers(0, 2)), "kill_replica": int(rng.integers(0, 2)),
                              "kill_at_step": first, "kill_every": every})


def assert_every_process_killed_once_and_caught_up(run_dir, summary):
    assert summary.server_restarts == 4 and summary.failed_workers == []
    events = read_metrics(run_dir / "metrics.jsonl")
    killed = [(e["server"], e["replica"]) for e in events if e.get("event") == "server_killed"]
    assert sorted(killed) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for index in range(2):
        for name in (f"server-{index}", f"server-{index}-r1"):
            log = [e["event"] for e in read_metrics(run_dir / "servers" / f"{name}.jsonl")]
            assert log.count("listening") == 2 and log.count("synced") >= 1  # its restart caught up
            assert "stream_gap" not in log and "demoted" not in log


def final_updates(run_dir, index):
    """The updates each replica of server `index` had applied when it stopped."""
    return [[e for e in read_metrics(run_dir / "servers" / f"{name}.jsonl") if e["event"] == "stopped"][-1]["updates"]
            for name in (f"server-{index}", f"server-{index}-r1")]


def test_bsp_with_every_server_process_killed_in_turn_ends_where_the_uninterrupted_run_ends(tmp_path):
    config = kill_each_server_config(tmp_path, "bsp", "bsp", seed=16)
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    run_dir = tmp_path / "bsp"
    assert_every_process_killed_once_and_caught_up(run_dir, summary)
    for rank in range(2):  # nobody restarted, nobody skipped a clock
        assert [r["step"] for r in read_metrics(run_dir / f"worker-{rank}.jsonl")] == list(range(config.train.steps))
    # Without replication the same kills lose the updates since each checkpoint; here none is lost.
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)
    assert summary.max_staleness == {0: 0, 1: 0}
    for index in range(2):  # one BSP update per clock and piece, on both replicas
        assert final_updates(run_dir, index) == [config.train.steps * 3] * 2


@pytest.mark.parametrize("consistency", ["asp", "ssp:2"])
def test_no_push_is_lost_or_applied_twice_with_every_server_process_killed_in_turn(tmp_path, consistency):
    """ASP and SSP apply each push on arrival: each replica's count of applied updates is workers x steps x pieces
    exactly (a lost push makes it lower, a push applied twice higher)."""
    config = kill_each_server_config(tmp_path, "count", consistency, seed=17)
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    run_dir = tmp_path / "count"
    assert_every_process_killed_once_and_caught_up(run_dir, summary)
    pieces = plan_shards({0: summary.weights.size}, 2, PIECE_NUMEL)[0]
    for index in range(2):
        per_push = sum(1 for piece in pieces if piece.server == index)
        assert final_updates(run_dir, index) == [2 * config.train.steps * per_push] * 2
    evals = [e for e in read_metrics(run_dir / "metrics.jsonl") if "test_loss" in e]
    assert evals[-1]["step"] == config.train.steps and evals[-1]["test_loss"] < evals[0]["test_loss"]


def test_a_paused_backup_then_a_paused_primary_lose_nothing(tmp_path):
    """SIGSTOP for 4 x failover_s, then SIGCONT: a slow process, not a dead one. The backup's primary serves alone
    meanwhile and the backup, awake again, joins again (it must not take over from a live primary); the paused
    primary's backup takes over, and the old primary, awake again, is fenced off and catches up. BSP still ends
    where single-process SGD ends."""
    config = make_config(tmp_path, "pause", sync={"servers": 2, "replication": 2, "consistency": "bsp",
                                                  "failover_s": 0.5, "retry_s": 0.2, "piece_numel": PIECE_NUMEL},
                         train={"steps": 120, "eval_every_s": 0.1}, straggler={"step_s": 0.04})
    run_dir = tmp_path / "pause"
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_ps(config, 2, timeout_s=240,
                                                                          show_progress=False)))
    runner.start()

    def step() -> int:
        return max((r.get("step", 0) for r in read_metrics(run_dir / "metrics.jsonl")), default=0)

    def wait_for_step(at_least: int) -> None:
        deadline = time.monotonic() + 120
        while step() < at_least and runner.is_alive():
            assert time.monotonic() < deadline, "the run stopped making progress"
            time.sleep(0.05)

    paused = []
    try:
        wait_for_step(10)
        for name in ("server-0-r1", "server-1"):  # a backup, then a primary
            assert runner.is_alive(), "the run ended before the pauses"
            pid = [e for e in read_metrics(run_dir / "servers" / f"{name}.jsonl") if e["event"] == "listening"][-1]
            os.kill(pid["pid"], signal.SIGSTOP)
            paused.append(pid["pid"])
            time.sleep(4 * config.sync.failover_s)
            os.kill(pid["pid"], signal.SIGCONT)
            wait_for_step(step() + 8)
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # already gone: the run has ended
        runner.join(timeout=240)
    summary = result["summary"]
    assert summary.server_restarts == 0 and summary.failed_workers == []
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)
    backup_log = [e["event"] for e in read_metrics(run_dir / "servers" / "server-0.jsonl")]
    assert "backup_lost" in backup_log  # the pause was long enough to matter
    primary_log = [e["event"] for e in read_metrics(run_dir / "servers" / "server-1.jsonl")]
    assert "demoted" in primary_log and primary_log.count("synced") >= 1
    for index in range(2):
        assert final_updates(run_dir, index) == [config.train.steps * 3] * 2


class FakeTransport:
    """What a Replica sends, recorded instead of sent."""

    def __init__(self):
        self.to_partner, self.to_workers = [], []

    def connect_partner(self, endpoint):
        self.endpoint = endpoint

    def send_partner(self, header, payload=None):
        self.to_partner.append(header)
        return True

    def send_msg(self, peer, header, payload=None, track=False):
        self.to_workers.append((peer, header.op, None if payload is None else payload.copy()))


def test_replies_wait_for_the_backups_ack_and_a_lost_backup_releases_them():
    """The primary's side of the protocol by hand (replication.Replica, no sockets)."""
    from plait.ps.replication import Change, Replica, Role
    from plait.ps.wire import Header, Op

    transport = FakeTransport()
    replica = Replica(transport, replica=0, partner="tcp://127.0.0.1:1", failover_s=1.0, fresh=True, now=0.0)
    assert replica.role is Role.PRIMARY and replica.tick(0.0) is None  # connected; alone until a HELLO
    weights = np.zeros(3, np.float32)
    assert not replica.reply(b"w", Header(Op.VALUE), weights)          # no backup yet: answered at once
    replica.start_stream(b"snapshot", now=0.1)
    replica.send_change(Change.PUSH, 0.2, np.ones(3, np.float32), worker=0, clock=0)
    assert [(h.op, h.extra, h.req) for h in transport.to_partner] == [(Op.REPLICATE, Change.SNAPSHOT, 1),
                                                                      (Op.REPLICATE, Change.PUSH, 2)]
    assert replica.reply(b"w", Header(Op.VALUE), weights)              # held: the backup lacks change 2
    weights += 1                                                       # the live weights move on meanwhile
    replica.on_ack(1, now=0.3)
    assert replica.held                                                # change 2 not acknowledged yet
    replica.on_ack(2, now=0.4)
    assert not replica.held and transport.to_workers[-1][0] == b"w"
    np.testing.assert_array_equal(transport.to_workers[-1][2], np.zeros(3))  # the value as of the reply
    replica.send_change(Change.PUSH, 0.5, np.ones(3, np.float32), worker=0, clock=1)
    assert replica.reply(b"w", Header(Op.ACK), None)
    assert replica.tick(1.0) is None                                   # silent for 0.6 s < failover_s
    replica.awake(3.0)                                                 # this process was paused: no verdict
    assert replica.tick(3.1) is None and replica.held
    events = [replica.tick(3.1 + 0.1 * i) for i in range(1, 12)]      # the loop ticks every 0.1 s at most
    assert events.index("backup_lost") == 9  # at 4.1: over failover_s after the pause ended (3.0), not before
    assert not replica.held and not replica.in_sync and transport.to_workers[-1][1] == Op.ACK
    replica.tick(4.6)                                                  # alone: heartbeats outside the stream
    assert transport.to_partner[-1].req == 0 and transport.to_partner[-1].extra == Change.HEARTBEAT


def test_a_restarted_replica_joins_and_says_hello_until_its_snapshot():
    from plait.ps.replication import Replica, Role
    from plait.ps.wire import Op

    transport = FakeTransport()
    replica = Replica(transport, replica=0, partner="tcp://127.0.0.1:1", failover_s=1.0, fresh=False, now=0.0)
    assert replica.role is Role.JOINING  # a restart never serves before it has heard from its partner
    replica.tick(0.0)
    replica.tick(0.3)                    # within failover_s / 2 of the first: no second HELLO yet
    replica.tick(0.6)
    assert [h.op for h in transport.to_partner] == [Op.HELLO, Op.HELLO]
