"""Parameter servers facing hostile peers (issue 14): real server processes on 127.0.0.1, raw ZeroMQ peers sending
what no KVStore would, bounded waits. Where a server may listen, who may send what (trust.py), finite values only,
a maximum message size, and refusals logged as counts instead of a line each."""

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from test_ps_consistency import start_servers

from plait.ps.checkpoint import load_shards
from plait.ps.kvstore import KVStore
from plait.ps.refusals import CountedLog
from plait.ps.security import CLIENT, LAUNCHER, SERVER, CurveKeys, make_keys
from plait.ps.server_config import ServerConfig, message_limit
from plait.ps.trust import endpoint_is_local, is_loopback
from plait.ps.wire import Header, Op
from plait.runtime.metrics_log import read_metrics


def raw_peer(context: zmq.Context, endpoint: str, keys=None, identity: str = CLIENT) -> zmq.Socket:
    """A DEALER that speaks the wire by hand, presenting `identity`'s CurveZMQ key when `keys` is given."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        CurveKeys(keys, identity).secure_client(socket)
    socket.connect(endpoint)
    return socket


def answers(socket: zmq.Socket, count: int) -> dict[int, tuple[Op, str]]:
    """The next `count` answers, by request id: (op, the ERROR's text)."""
    found: dict[int, tuple[Op, str]] = {}
    while len(found) < count:
        assert socket.poll(10_000), f"no answer after {found}"
        header_frame, *rest = socket.recv_multipart()
        header = Header.unpack(header_frame)
        found[header.req] = (header.op, rest[0].decode() if rest else "")
    return found


def stop(proc, log_path) -> list[dict]:
    """SIGTERM (a clean stop: final checkpoint, the refusals since the last line, the `stopped` totals); its events."""
    proc.terminate()
    proc.join(timeout=30)
    assert proc.exitcode == 0
    return read_metrics(log_path)


# -- 1. where a server may listen ---------------------------------------------------------------------------------
def test_only_loopback_endpoints_count_as_local():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "*", "10.0.0.7", "eth0", "host-a", "::"):
        assert not is_loopback(host), host
    assert endpoint_is_local("ipc:///tmp/ps") and endpoint_is_local("tcp://127.0.0.1:0")
    assert not endpoint_is_local("tcp://*:5000") and not endpoint_is_local("tcp://[::]:5000")


def test_a_server_beyond_loopback_without_curve_refuses_to_start_unless_told(tmp_path):
    from plait.ps.config import SyncSection
    from plait.ps.node import run_server_node

    with pytest.raises(ValueError, match=r"server 0 \(--bind\) would listen on tcp://0.0.0.0:5000.*sync.curve_keys"
                                         r".*sync.insecure_bind = true"):
        ServerConfig(index=0, endpoint="tcp://0.0.0.0:5000", num_workers=1)
    with pytest.raises(ValueError, match="sync.host would listen on tcp://10.0.0.7:0"):
        SyncSection(host="10.0.0.7")
    SyncSection(host="10.0.0.7", curve_keys="keys")       # CurveZMQ: fine anywhere
    SyncSection(host="10.0.0.7", insecure_bind=True)      # told explicitly
    config = tmp_path / "cfg.toml"
    config.write_text('[sync]\nkind = "ps"\n')
    with pytest.raises(ValueError, match="sync.insecure_bind"):
        run_server_node(str(config), workers=1, index=0, bind="tcp://0.0.0.0:0", state_dir=str(tmp_path / "s"))
    # Told (--insecure): it serves every interface, and says so once.
    state = tmp_path / "state"
    server = subprocess.Popen([sys.executable, "-m", "plait.cli", "ps", "server", "--config", str(config), "--index",
                               "0", "--workers", "1", "--bind", "tcp://0.0.0.0:0", "--state-dir", str(state),
                               "--fresh", "--insecure"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (state / "server-0.endpoint").exists():
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = (state / "server-0.endpoint").read_text().rsplit(":", 1)[1]
        kv = KVStore([f"tcp://127.0.0.1:{port}"], 0, timeout_s=20.0)
        weights = np.zeros(4, np.float32)
        kv.init(0, weights)
        kv.wait(kv.pushpull(0, np.full(4, -1.0, np.float32), weights))
        np.testing.assert_allclose(weights, np.full(4, 0.1, np.float32))  # the config's SGD, lr 0.1
        kv.close()
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0
    assert stderr.count("without CurveZMQ (sync.insecure_bind)") == 1
    assert [e["event"] for e in read_metrics(state / "server-0.jsonl")].count("insecure_bind") == 1


# -- 2. control messages under CurveZMQ ---------------------------------------------------------------------------
def test_with_curve_only_control_keys_may_shut_down_say_goodbye_or_create_pieces(tmp_path):
    """A worker's key may push and pull, and INIT a piece that exists (to read its clock); SHUTDOWN, BYE, an INIT
    that would create a piece, and the replication ops are refused with an ERROR, counted, and change nothing. The
    launcher's key creates the pieces and ends the server."""
    keys = make_keys(tmp_path / "keys").directory
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, curve_keys=str(keys))
    context = zmq.Context()
    rogue = raw_peer(context, endpoints[0], keys, CLIENT)
    try:
        rogue.send_multipart([Header(Op.INIT, worker=0, key=7, req=1, numel=4).pack(),
                              np.zeros(4, np.float32).tobytes()])
        rogue.send_multipart([Header(Op.SHUTDOWN, req=2).pack()])
        rogue.send_multipart([Header(Op.BYE, worker=0, req=3).pack()])
        rogue.send_multipart([Header(Op.HELLO, req=4).pack()])
        rogue.send_multipart([Header(Op.REPLICATE, req=5, extra=1, numel=3).pack(), b"abc"])
        found = answers(rogue, 5)
        assert all(op == Op.ERROR for op, _ in found.values())
        assert "creating a piece takes a control key" in found[1][1]
        assert "SHUTDOWN from a worker key: only control keys may send it" in found[2][1]
        assert "BYE from a worker key: only control keys may send it" in found[3][1]
        assert "HELLO from a worker key: only server keys may send it" in found[4][1]
        assert "REPLICATE from a worker key" in found[5][1]
        assert servers[0].is_alive()
        # The launcher's key creates the piece; a worker's INIT then reads its clock, and it trains.
        seeder = KVStore(endpoints, -1, timeout_s=20.0, curve_keys=CurveKeys(keys, LAUNCHER))
        seeder.init(0, np.ones(4, np.float32))
        seeder.close(goodbye=False)
        kv = KVStore(endpoints, 0, timeout_s=20.0, curve_keys=keys)
        weights = np.zeros(4, np.float32)
        kv.init(0, weights)
        assert kv.clock(0) == -1
        kv.wait(kv.pushpull(0, np.full(4, -1.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(4, 2.0, np.float32))  # the launcher's ones, one step on
        kv.close()  # no goodbye with a worker's key: it would be refused
        boss = raw_peer(context, endpoints[0], keys, LAUNCHER)
        boss.send_multipart([Header(Op.SHUTDOWN, req=9).pack()])
        assert answers(boss, 1)[9][0] == Op.ACK
        servers[0].join(timeout=30)
        assert servers[0].exitcode == 0
        boss.close()
    finally:
        rogue.close()
        context.term()
        for proc in servers:
            proc.kill()
    events = read_metrics(tmp_path / "server-0.jsonl")
    assert events[-1]["event"] == "stopped" and events[-1]["refused"] == {"unauthorised": 5}
    assert [e["event"] for e in events].count("finished") == 0  # the refused BYE took nobody out of the clocks


def test_plait_ps_init_creates_the_models_pieces_with_the_launchers_key(tmp_path):
    """On several hosts with CurveZMQ, `plait ps init` does what the local launcher does before the workers start."""
    from plait.cli import app
    from plait.ps.config import PSRunConfig
    from plait.ps.trainer import PARAMS_KEY, build_flat_model

    keys = make_keys(tmp_path / "keys").directory
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, curve_keys=str(keys))
    config = tmp_path / "cfg.toml"
    config.write_text(f'[sync]\nkind = "ps"\ncurve_keys = "{keys}"\n')
    try:
        app(["ps", "init", "--config", str(config), "--workers", "1", "--servers", endpoints[0]])
        _, weights, _ = build_flat_model(PSRunConfig())
        kv = KVStore(endpoints, 0, timeout_s=20.0, curve_keys=keys)
        pulled = np.zeros_like(weights.numpy())
        kv.init(PARAMS_KEY, pulled)  # a worker's key: the pieces exist, so this only reads its clock
        kv.wait(kv.pull(PARAMS_KEY, pulled))
        np.testing.assert_array_equal(pulled, weights.numpy())  # the launcher's initial weights, not the zeros
        kv.close()
    finally:
        for proc in servers:
            proc.kill()


def test_a_replica_presents_the_servers_key_and_a_worker_key_cannot_replicate(tmp_path):
    """The partner link presents server.key: the replication ops are served from it alone."""
    keys = make_keys(tmp_path / "keys").directory
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, curve_keys=str(keys))
    context = zmq.Context()
    partner = raw_peer(context, endpoints[0], keys, SERVER)
    try:
        partner.send_multipart([Header(Op.PUSH, worker=0, key=0, clock=0, req=1, numel=4).pack(),
                                np.zeros(4, np.float32).tobytes()])
        assert "PUSH from a server key: only worker or control keys may send it" in answers(partner, 1)[1][1]
    finally:
        partner.close()
        context.term()
        for proc in servers:
            proc.kill()


# -- 3. finite values -----------------------------------------------------------------------------------------------
def test_non_finite_pushes_are_refused_and_never_applied(tmp_path):
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1)
    context = zmq.Context()
    rogue = raw_peer(context, endpoints[0])
    try:
        kv = KVStore(endpoints, 0, timeout_s=20.0)
        weights = np.zeros(4, np.float32)
        kv.init(0, weights)
        bad = np.array([1.0, np.nan, 0.0, 0.0], np.float32)
        rogue.send_multipart([Header(Op.PUSH, worker=0, key=0, clock=0, req=1, numel=4).pack(), bad.tobytes()])
        rogue.send_multipart([Header(Op.PUSHPULL, worker=0, key=0, clock=0, req=2, numel=4).pack(),
                              np.full(4, np.inf, np.float32).tobytes()])
        rogue.send_multipart([Header(Op.INIT, worker=0, key=1, req=3, numel=4).pack(), bad.tobytes()])
        found = answers(rogue, 3)
        for req, key in ((1, 0), (2, 0), (3, 1)):
            assert found[req][0] == Op.ERROR and f"key {key}: the values hold NaN or Inf" in found[req][1]
        # Clock 0 was not taken by the refused pushes: the worker's own push of clock 0 is applied, once.
        kv.wait(kv.pushpull(0, np.full(4, -1.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.ones(4, np.float32))
        kv.close()
        events = stop(servers[0], tmp_path / "server-0.jsonl")
    finally:
        rogue.close()
        context.term()
        for proc in servers:
            proc.kill()
    assert events[-1]["refused"] == {"nonfinite": 3}
    assert np.isfinite(load_shards(tmp_path / "server-0.npz").shards[0, 0].param).all()


def test_an_update_that_overflows_is_named_and_the_last_good_checkpoint_stays(tmp_path):
    """Finite pushes can still overflow the weights (3e38 + 3e38 is inf in float32): the server names the clock and
    the worker where it happened and writes no checkpoint from then on, so the one on disk is the last good state."""
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, checkpoint_every=1)
    try:
        kv = KVStore(endpoints, 0, timeout_s=20.0)
        weights = np.zeros(4, np.float32)
        kv.init(0, weights)
        huge = np.full(4, -3e38, np.float32)
        kv.wait(kv.pushpull(0, huge, weights))  # SGD, lr 1: 3e38, finite, checkpointed
        kv.wait(kv.pushpull(0, huge, weights))  # inf
        assert np.isinf(weights).all()
        kv.close()
        events = stop(servers[0], tmp_path / "server-0.jsonl")
    finally:
        for proc in servers:
            proc.kill()
    (diverged,) = [e for e in events if e["event"] == "diverged"]
    assert (diverged["clock"], diverged["worker"], diverged["key"]) == (1, 0, 0)
    assert diverged["last_checkpoint"] == str(tmp_path / "server-0.npz") and diverged["checkpoint_updates"] == 1
    assert [e["updates"] for e in events if e["event"] == "checkpoint"] == [1]
    assert [e["event"] for e in events][-2:] == ["checkpoint_refused", "stopped"]  # not even at the stop
    np.testing.assert_array_equal(load_shards(tmp_path / "server-0.npz").shards[0, 0].param,
                                  np.full(4, 3e38, np.float32))


# -- 4. message size ----------------------------------------------------------------------------------------------
def test_the_message_limit_is_sized_from_the_pieces_and_named_when_wrong():
    from plait.ps.config import SyncSection
    from plait.ps.sharding import DEFAULT_PIECE_NUMEL

    assert ServerConfig(index=0, endpoint="tcp://127.0.0.1:0", num_workers=1).max_message_bytes == \
        2 * (DEFAULT_PIECE_NUMEL * 8 + 52) == SyncSection().message_limit()
    assert message_limit(0, 0) == 1 << 30 and message_limit(-1, 100) == -1 and message_limit(8192, 100) == 8192
    with pytest.raises(ValueError, match="sync.max_message_bytes must be -1 .* got 100"):
        SyncSection(max_message_bytes=100)
    with pytest.raises(ValueError, match=r"sync.max_message_bytes .*piece_numel float32 values \(40000 bytes\)"):
        SyncSection(max_message_bytes=8192, piece_numel=10_000)


def test_an_oversized_frame_cuts_off_that_peer_only_and_is_counted(tmp_path):
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, max_message_bytes=64 * 1024)
    context = zmq.Context()
    try:
        kv = KVStore(endpoints, 0, timeout_s=20.0)
        weights = np.zeros(1000, np.float32)
        kv.init(0, weights)
        numel = 1 << 20  # a 4 MiB push: never read, never answered
        for attempt in range(3):
            rogue = raw_peer(context, endpoints[0])
            rogue.send_multipart([Header(Op.PUSH, worker=0, key=0, clock=attempt, req=1, numel=numel).pack(),
                                  np.zeros(numel, np.float32).tobytes()])
            assert not rogue.poll(1000), "the server answered an oversized message"
            rogue.close()
            kv.wait(kv.pushpull(0, np.full(1000, -1.0, np.float32), weights))  # the worker is served on
        np.testing.assert_array_equal(weights, np.full(1000, 3.0, np.float32))
        assert servers[0].is_alive()
        kv.close()
        events = stop(servers[0], tmp_path / "server-0.jsonl")
    finally:
        context.term()
        for proc in servers:
            proc.kill()
    assert events[-1]["disconnects"] >= 3 and events[-1]["refused"] == {}


def test_a_snapshot_larger_than_the_message_limit_reaches_the_backup_in_chunks(tmp_path):
    """Replication shares the workers' socket and so its limit: replica 1, restarted once replica 0 holds a 96 KB
    shard, catches up from chunks of at most 4 KiB under an 8 KiB limit, and then serves the same weights when
    replica 0 is killed. Under CurveZMQ: the replicas know each other by the servers' key, and refuse nothing."""
    import multiprocessing as mp

    from plait.ps.consistency import Consistency
    from plait.ps.optim import OptimizerConfig
    from plait.ps.server import run_server

    keys = make_keys(tmp_path / "keys").directory

    def start(replica: int, endpoint: str = "tcp://127.0.0.1:0"):
        config = ServerConfig(index=0, endpoint=endpoint, num_workers=1, replication=2, replica=replica,
                              consistency=Consistency.from_setting("asp"), optimizer=OptimizerConfig(lr=1.0),
                              checkpoint_every=0, state_dir=str(tmp_path), resume=False, failover_s=0.5,
                              max_message_bytes=8192, curve_keys=str(keys))
        proc = mp.get_context("spawn").Process(target=run_server, args=(config,), daemon=True)
        proc.start()
        return proc

    def wait_for(name: str, event: str, count: int = 1) -> dict:
        deadline = time.monotonic() + 60
        while True:
            found = [e for e in read_metrics(tmp_path / f"{name}.jsonl") if e["event"] == event]
            if len(found) >= count:
                return found[-1]
            assert time.monotonic() < deadline, f"no {event} in {name}"
            time.sleep(0.05)

    processes = [start(0), start(1)]
    try:
        wait_for("server-0-r1", "synced")  # of an empty shard
        endpoints = [(tmp_path / f"{name}.endpoint").read_text() for name in ("server-0", "server-0-r1")]
        seeder = KVStore(endpoints[:1], -1, timeout_s=30.0, piece_numel=1000, backups=endpoints[1:],
                         curve_keys=CurveKeys(keys, LAUNCHER))
        seeder.init(0, np.zeros(24_000, np.float32))
        seeder.close(goodbye=False)
        kv = KVStore(endpoints[:1], 0, retry_s=0.2, timeout_s=30.0, piece_numel=1000, backups=endpoints[1:],
                     curve_keys=keys)
        weights = np.zeros(24_000, np.float32)
        kv.init(0, weights)
        for _ in range(2):
            kv.wait(kv.pushpull(0, np.full(24_000, -1.0, np.float32), weights))
        processes[1].kill()  # replica 1 restarts, as the launcher restarts it: on its endpoint, with nothing
        processes[1].join()
        processes[1] = start(1, endpoints[1])
        assert wait_for("server-0-r1", "synced", count=2)["updates"] == 2 * 24  # 24 pieces, each updated twice
        assert wait_for("server-0", "streaming", count=2)["chunks"] > 20
        processes[0].kill()
        processes[0].join()
        kv.wait(kv.pushpull(0, np.full(24_000, -1.0, np.float32), weights))  # served by replica 1
        np.testing.assert_array_equal(weights, np.full(24_000, 3.0, np.float32))
        kv.close(goodbye=False)
    finally:
        for proc in processes:
            proc.kill()
    for name in ("server-0", "server-0-r1"):
        assert not [e for e in read_metrics(tmp_path / f"{name}.jsonl") if e["event"] == "refused"]


# -- 5. refusals logged as counts -----------------------------------------------------------------------------------
def test_a_counted_log_writes_the_first_refusal_at_once_then_a_count_and_a_sample_per_interval():
    lines = []
    log = CountedLog(lambda event, **fields: lines.append({"event": event, **fields}), "refused", every_s=10.0)
    log.count("malformed", 0.0, text="first")
    for t in range(1, 6):
        log.count("nonfinite" if t % 2 else "malformed", float(t), text=f"at {t}")
    assert [line["count"] for line in lines] == [1]
    log.tick(9.9)
    assert len(lines) == 1
    log.tick(10.0)
    assert lines[1] == {"event": "refused", "count": 5, "reasons": {"nonfinite": 3, "malformed": 2},
                        "samples": {"nonfinite": {"text": "at 1"}, "malformed": {"text": "at 2"}}, "total": 6}
    log.tick(30.0)
    log.flush()
    assert len(lines) == 2 and log.totals == {"malformed": 3, "nonfinite": 3}


def test_a_flood_of_garbage_writes_a_few_lines_not_one_each(tmp_path):
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, refusal_log_s=0.5)
    context = zmq.Context()
    rogue = raw_peer(context, endpoints[0])
    try:
        started = time.monotonic()
        for n in range(500):
            rogue.send_multipart([b"garbage %d" % n])
        kv = KVStore(endpoints, 0, timeout_s=20.0)  # served behind the flood
        kv.init(0, np.zeros(4, np.float32))
        kv.close()
        time.sleep(0.6)
        events = stop(servers[0], tmp_path / "server-0.jsonl")
        elapsed = time.monotonic() - started
    finally:
        rogue.close()
        context.term()
        for proc in servers:
            proc.kill()
    refused = [e for e in events if e["event"] == "refused"]
    assert sum(e["count"] for e in refused) == 500 and events[-1]["refused"] == {"malformed": 500}
    assert len(refused) <= 2 + elapsed / 0.5  # the first at once, then at most one per interval, and the stop's
    assert refused[0]["count"] == 1 and refused[0]["samples"]["malformed"]["text"].startswith("ps wire: header of")
