"""Property test with real server and worker processes on 127.0.0.1: SSP(s) never lets a worker read parameters
missing more than s clocks of any worker's updates; BSP none; ASP can read arbitrarily stale parameters.

Each worker w pushes the gradient -N·e_w (SGD, lr 1; asynchronous pushes count 1/N), so parameter w counts the
pushes of worker w the server has applied. A pull at clock c that reads counts n_v has true staleness
c - min_v(n_v - 1): measured on the values read, not taken from the server's word. Delays are random (seeded), one
worker is a straggler.
"""

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from plait.ps.consistency import Consistency
from plait.ps.kvstore import KVStore
from plait.ps.optim import OptimizerConfig
from plait.ps.server import run_server
from plait.ps.server_config import ServerConfig

NUM_WORKERS = 3
CLOCKS = 12


def start_servers(state_dir: Path, count: int, consistency: str, worker_timeout_s: float = 30.0,
                  num_workers: int = NUM_WORKERS, checkpoint_every: int = 0, curve_keys: str = "", **settings):
    """`count` server processes (SGD, lr 1); `settings` are further ServerConfig fields."""
    ctx = mp.get_context("spawn")
    procs = []
    for index in range(count):
        config = ServerConfig(index=index, endpoint="tcp://127.0.0.1:0", num_workers=num_workers,
                              consistency=Consistency.from_setting(consistency),
                              optimizer=OptimizerConfig(name="sgd", lr=1.0), checkpoint_every=checkpoint_every,
                              worker_timeout_s=worker_timeout_s,
                              state_dir=str(state_dir), resume=False, curve_keys=curve_keys, **settings)
        proc = ctx.Process(target=run_server, args=(config,), daemon=True)
        proc.start()
        procs.append(proc)
    endpoints = []
    deadline = time.monotonic() + 60
    for index in range(count):
        path = state_dir / f"server-{index}.endpoint"
        while not path.exists():
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        endpoints.append(path.read_text())
    return procs, endpoints


def counting_worker(rank: int, endpoints: list[str], seed: int, straggler_s: float, results) -> None:
    rng = np.random.default_rng([seed, rank])
    kv = KVStore(endpoints, rank, retry_s=1.0, timeout_s=60.0)
    counts = np.zeros(NUM_WORKERS, dtype=np.float32)
    kv.init(0, counts)
    grad = np.zeros(NUM_WORKERS, dtype=np.float32)
    grad[rank] = -NUM_WORKERS
    seen = []
    for clock in range(CLOCKS):
        time.sleep(straggler_s if rank == 0 else rng.uniform(0, 0.004))
        push = kv.push(0, grad)
        pull = kv.pull(0, counts)
        kv.wait(push)
        kv.wait(pull)
        applied = np.rint(counts).astype(int)
        seen.append((clock, int(clock - (applied.min() - 1)), kv.stats.last_staleness))
    kv.close()
    results.put((rank, seen))


def run_counting(tmp_path: Path, consistency: str, seed: int = 0, straggler_s: float = 0.04):
    servers, endpoints = start_servers(tmp_path, 1, consistency)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=counting_worker, args=(rank, endpoints, seed, straggler_s, results), daemon=True)
               for rank in range(NUM_WORKERS)]
    try:
        for proc in workers:
            proc.start()
        seen = dict(results.get(timeout=90) for _ in workers)
        for proc in workers:
            proc.join(timeout=10)
            assert proc.exitcode == 0
    finally:
        for proc in workers + servers:
            if proc.is_alive():
                proc.kill()
    return seen


@pytest.mark.parametrize("consistency,bound", [("bsp", 0), ("ssp:1", 1), ("ssp:3", 3)])
def test_ssp_never_reads_staler_than_its_bound(tmp_path, consistency, bound):
    seen = run_counting(tmp_path, consistency, seed=bound)
    true_staleness = [true for records in seen.values() for _, true, _ in records]
    assert max(true_staleness) <= bound
    # the straggler really held the fast workers back to the bound (the test can fail the other way)
    assert max(true for rank, records in seen.items() if rank != 0 for _, true, _ in records) == bound
    # the staleness a worker records in its metrics is the one it actually saw
    assert all(true == reported for records in seen.values() for _, true, reported in records)


def test_asp_reads_staler_than_any_bound(tmp_path):
    seen = run_counting(tmp_path, "asp")
    fast = [true for rank, records in seen.items() if rank != 0 for _, true, _ in records]
    assert max(fast) > 3  # fast workers ran far ahead of the straggler's updates
    assert all(true == reported for records in seen.values() for _, true, reported in records)


def test_kvstore_errors_name_the_key_and_stage(tmp_path):
    servers, endpoints = start_servers(tmp_path, 1, "asp")
    try:
        kv = KVStore(endpoints, 0, retry_s=1.0, timeout_s=20.0)
        with pytest.raises(KeyError, match="key 5 was never initialised"):
            kv.pull(5, np.zeros(3, np.float32))
        kv.init(0, np.arange(10, dtype=np.float32))
        with pytest.raises(ValueError, match="push key 0: got 9 float32 values, the key holds 10"):
            kv.push(0, np.zeros(9, np.float32))
        other = KVStore(endpoints, 1, retry_s=1.0, timeout_s=20.0)
        with pytest.raises(RuntimeError, match="server 0, INIT key 0: .*same sharding"):
            other.init(0, np.zeros(12, np.float32))  # a worker that disagrees on the key's size
        cut = KVStore(endpoints, 2, retry_s=1.0, timeout_s=20.0, piece_numel=4)
        with pytest.raises(RuntimeError, match=r"piece \[0, \+4\) does not match the stored pieces \[0, \+10\)"):
            cut.init(0, np.zeros(10, np.float32))  # a worker that cuts the key into other pieces
        out = np.zeros(10, np.float32)
        kv.pull(0, out).wait()  # the first writer's value stands
        np.testing.assert_array_equal(out, np.arange(10, dtype=np.float32))
        kv.close()
        other.close(goodbye=False)
        cut.close(goodbye=False)
    finally:
        for proc in servers:
            proc.kill()


def test_pulls_of_large_keys_are_never_torn_by_concurrent_updates(tmp_path):
    """Servers send live weights zero-copy and update copy-on-write: a pull answered while pushes keep coming must
    hold one version of the weights, never half of one and half of the next."""
    import threading

    servers, endpoints = start_servers(tmp_path, 1, "asp")
    numel = 2_000_000  # far above ZeroMQ's copy threshold: really sent zero-copy
    try:
        # One piece: a piece is the unit a server updates and answers atomically (pieces of a key are independent).
        writer = KVStore(endpoints, 0, timeout_s=30.0, piece_numel=0)
        reader = KVStore(endpoints, 1, timeout_s=30.0, piece_numel=0)
        writer.init(0, np.zeros(numel, np.float32))
        reader.init(0, np.zeros(numel, np.float32))
        grad = np.full(numel, -float(NUM_WORKERS), np.float32)  # each push adds exactly 1 to every element
        stop = threading.Event()

        def push_forever():
            while not stop.is_set():
                tickets = [writer.push(0, grad) for _ in range(4)]  # several updates in flight
                for ts in tickets:
                    writer.wait(ts)

        thread = threading.Thread(target=push_forever, daemon=True)
        thread.start()
        out = np.empty(numel, np.float32)
        versions = []
        for _ in range(40):
            reader.wait(reader.pull(0, out))
            assert out.min() == out.max(), f"torn read: values from {out.min()} to {out.max()}"
            versions.append(float(out[0]))
        stop.set()
        thread.join(timeout=30)
        assert len(set(versions)) > 5  # the weights really changed between the pulls
        writer.close()
        reader.close()
    finally:
        for proc in servers:
            proc.kill()


def test_a_resent_pushpull_waiting_under_bsp_still_returns_the_new_value(tmp_path):
    """A PUSHPULL sent twice (a resend racing the first answer) while its pull waits for the other workers: the
    gradient counts once, and the wait ends only with the value of the completed clock, never on an ACK."""
    servers, endpoints = start_servers(tmp_path, 1, "bsp")
    try:
        stores = [KVStore(endpoints, rank, retry_s=5.0, timeout_s=30.0) for rank in range(NUM_WORKERS)]
        for kv in stores:
            kv.init(0, np.zeros(4, np.float32))
        out = np.full(4, -7.0, np.float32)
        first = stores[0].pushpull(0, np.full(4, 3.0, np.float32), out)
        (request,) = stores[0]._outstanding.values()
        stores[0].transport.send_msg(request.server, request.header, request.payload)  # the same request again
        time.sleep(0.3)  # both copies parked at the server: the others have not pushed clock 0 yet
        others = [kv.pushpull(0, np.zeros(4, np.float32), np.empty(4, np.float32)) for kv in stores[1:]]
        stores[0].wait(first)
        for kv, ts in zip(stores[1:], others):
            kv.wait(ts)
        np.testing.assert_array_equal(out, np.full(4, -1.0, np.float32))  # lr 1 × mean of (3, 0, 0), applied once
        for kv in stores:
            kv.close()
    finally:
        for proc in servers:
            proc.kill()


@pytest.mark.parametrize("consistency", ["asp", "bsp"])
def test_checkpoint_every_counts_updates_of_the_whole_shard_not_of_its_pieces(tmp_path, consistency):
    """A key cut into 3 pieces: 4 steps are 12 piece updates but 4 updates of the shard, so checkpoint_every = 2
    writes 2 checkpoints (after steps 2 and 4), not 6. BSP applies a piece's update once its clock completes."""
    from plait.ps.checkpoint import load_shards
    from plait.runtime.metrics_log import read_metrics

    servers, endpoints = start_servers(tmp_path, 1, consistency, num_workers=1, checkpoint_every=2)
    try:
        kv = KVStore(endpoints, 0, retry_s=1.0, timeout_s=20.0, piece_numel=4)
        weights = np.zeros(12, np.float32)
        kv.init(0, weights)
        for _ in range(4):
            kv.wait(kv.pushpull(0, np.full(12, -1.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(12, 4.0, np.float32))  # SGD, lr 1: every piece 4 times
        deadline = time.monotonic() + 20
        while len([r for r in read_metrics(tmp_path / "server-0.jsonl") if r["event"] == "checkpoint"]) < 2:
            assert time.monotonic() < deadline, "the server wrote fewer than 2 checkpoints"
            time.sleep(0.02)
        time.sleep(0.2)  # a third checkpoint, if the count were wrong, would have followed at once
        checkpoints = [r for r in read_metrics(tmp_path / "server-0.jsonl") if r["event"] == "checkpoint"]
        assert [r["updates"] for r in checkpoints] == [6, 12]
        snapshot = load_shards(tmp_path / "server-0.npz")
        assert len(snapshot.shards) == 3
        for shard in snapshot.shards.values():
            np.testing.assert_array_equal(shard.param, np.full(4, 4.0, np.float32))
        kv.close()
    finally:
        for proc in servers:
            proc.kill()


def test_server_survives_garbage_and_answers_inconsistent_requests_with_errors(tmp_path):
    """A raw ZeroMQ peer sends what no KVStore would: the server logs and drops what is not a request, answers a
    request whose payload contradicts its header with an ERROR naming the key, and a real worker trains on after."""
    import zmq

    from plait.ps.wire import HEADER_BYTES, Header, Op
    from plait.runtime.metrics_log import read_metrics

    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, refusal_log_s=600.0)
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        kv = KVStore(endpoints, 0, retry_s=1.0, timeout_s=20.0)
        weights = np.zeros(8, np.float32)
        kv.init(0, weights)
        rogue.connect(endpoints[0])
        bad_version = bytearray(Header(Op.PULL, worker=0, numel=8).pack())
        bad_version[0] = 99
        bad_op = bytearray(Header(Op.PULL, worker=0, numel=8).pack())
        bad_op[1] = 77
        for frames in ([b"x" * 3], [b""], [bytes(bad_version)], [bytes(bad_op)], [b"\xff" * HEADER_BYTES]):
            rogue.send_multipart(frames)  # not requests: dropped, nothing to answer
        short = Header(Op.PUSH, worker=0, key=0, clock=0, req=1, numel=8)
        rogue.send_multipart([short.pack(), np.zeros(5, np.float32).tobytes()])  # 5 values where it says 8
        odd = Header(Op.PUSH, worker=0, key=0, clock=0, req=2, numel=8)
        rogue.send_multipart([odd.pack(), b"\x00" * 7])  # not a whole number of float32
        empty = Header(Op.INIT, worker=0, key=3, req=3, numel=0)
        rogue.send_multipart([empty.pack(), b""])
        huge = Header(Op.PULL, worker=0, key=0, clock=2**63 - 1, req=4, numel=8)  # its staleness fits no field
        rogue.send_multipart([huge.pack()])
        spy = Header(Op.PUSH, worker=0, key=0, clock=5, req=5, numel=8, flags=1)  # an observer may only pull
        rogue.send_multipart([spy.pack(), np.zeros(8, np.float32).tobytes()])
        answers = {}
        while len(answers) < 5:
            assert rogue.poll(10_000), f"no ERROR answer, got {answers}"
            header_frame, *rest = rogue.recv_multipart()
            header = Header.unpack(header_frame)
            answers[header.req] = (header.op, rest[0].decode() if rest else "")
        assert answers[1][0] == Op.ERROR and "PUSH key 0" in answers[1][1]
        assert "says 8 float32 elements, the payload holds 20 bytes" in answers[1][1]
        assert answers[2][0] == Op.ERROR and "PUSH key 0" in answers[2][1]
        assert answers[3][0] == Op.ERROR and "empty piece" in answers[3][1]
        assert answers[4][0] == Op.ERROR and "clock 9223372036854775807 outside" in answers[4][1]
        assert answers[5][0] == Op.ERROR and "observer may only PULL" in answers[5][1]
        # The server still serves, and the refused pushes changed nothing: two SGD steps of -1 give 2.
        for _ in range(2):
            kv.wait(kv.pushpull(0, np.full(8, -1.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(8, 2.0, np.float32))
        assert servers[0].is_alive()
        kv.close()
        servers[0].terminate()  # SIGTERM: a clean stop, which logs what was refused since the last line
        servers[0].join(timeout=30)
        events = read_metrics(tmp_path / "server-0.jsonl")
        refused = [r for r in events if r["event"] == "refused"]
        # The first refusal at once, the other nine as one count and a sample per reason (refusal_log_s = 600)
        assert [r["count"] for r in refused] == [1, 9]
        assert refused[0]["samples"]["malformed"]["text"] == "ps wire: header of 3 bytes, expected 52"
        assert refused[1]["samples"]["unservable"]["op"] == "PUSH" and refused[1]["samples"]["malformed"]["peer"]
        assert events[-1]["event"] == "stopped" and events[-1]["refused"] == {"malformed": 5, "unservable": 5}
    finally:
        rogue.close()
        context.term()
        for proc in servers:
            proc.kill()


def test_a_refused_request_naming_a_dropped_worker_does_not_bring_it_back(tmp_path):
    """Under BSP a dropped worker that rejoined would hold the others back again; a message that is refused must
    not count as a sign of life."""
    import zmq

    from plait.ps.wire import Header, Op
    from plait.runtime.metrics_log import read_metrics

    servers, endpoints = start_servers(tmp_path, 1, "bsp", worker_timeout_s=0.3, num_workers=2)
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        silent = KVStore(endpoints, 1, retry_s=1.0, timeout_s=20.0)
        silent.init(0, np.zeros(4, np.float32))  # worker 1 is heard once, then never again

        def events(name):
            return [r for r in read_metrics(tmp_path / "server-0.jsonl") if r["event"] == name]

        deadline = time.monotonic() + 20
        while not any(r["worker"] == 1 for r in events("dropped")):
            assert time.monotonic() < deadline, "worker 1 was never dropped"
            time.sleep(0.05)
        rogue.connect(endpoints[0])
        bad = Header(Op.PUSH, worker=1, key=0, clock=0, req=1, numel=4)
        rogue.send_multipart([bad.pack(), np.zeros(3, np.float32).tobytes()])  # a wrong length: refused
        assert rogue.poll(10_000), "no answer to the refused push"
        assert Header.unpack(rogue.recv_multipart()[0]).op == Op.ERROR
        assert not any(r["worker"] == 1 for r in events("rejoined"))
        # Worker 0 alone now completes BSP clocks: its pull is answered without waiting for worker 1.
        kv = KVStore(endpoints, 0, retry_s=1.0, timeout_s=20.0)
        out = np.zeros(4, np.float32)
        kv.init(0, out)
        kv.wait(kv.pushpull(0, np.full(4, -1.0, np.float32), out))
        np.testing.assert_array_equal(out, np.full(4, 1.0, np.float32))
        kv.close()
        silent.close(goodbye=False)
    finally:
        rogue.close()
        context.term()
        for proc in servers:
            proc.kill()


def test_curve_keys_serve_only_peers_with_the_jobs_client_key(tmp_path):
    """With sync.curve_keys, a worker holding the job's keys trains (on pieces the launcher's key created); a plain
    peer and a peer with its own, unknown client key complete no handshake: the server never sees their messages,
    counts the refused handshakes, and they time out with a hint."""
    import shutil

    import zmq

    from plait.ps.security import LAUNCHER, CurveKeys, make_keys
    from plait.ps.wire import Header, Op
    from plait.runtime.metrics_log import read_metrics

    keys = make_keys(tmp_path / "keys").directory
    stranger = make_keys(tmp_path / "stranger").directory
    shutil.copy(keys / "server.key", stranger / "server.key")  # it knows the server, the server does not know it
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=1, curve_keys=str(keys))
    context = zmq.Context()
    plain = context.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    try:
        seeder = KVStore(endpoints, -1, timeout_s=20.0, curve_keys=CurveKeys(keys, LAUNCHER))
        seeder.init(0, np.zeros(6, np.float32))  # only a control key may create pieces
        seeder.close(goodbye=False)
        kv = KVStore(endpoints, 0, retry_s=1.0, timeout_s=20.0, curve_keys=keys)
        weights = np.zeros(6, np.float32)
        kv.init(0, weights)
        kv.wait(kv.pushpull(0, np.full(6, -2.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(6, 2.0, np.float32))
        for curve_keys, hint in ((None, "no keys"), (stranger, "the job's keys in")):
            outsider = KVStore(endpoints, 0, retry_s=0.2, timeout_s=1.5, curve_keys=curve_keys)
            with pytest.raises(TimeoutError, match=f"server 0 never answered at all.*{hint}"):
                outsider.init(0, np.zeros(6, np.float32))
            outsider.close(goodbye=False)
        plain.connect(endpoints[0])
        plain.send_multipart([b"garbage"])  # a plain peer's message: it never gets past the handshake
        plain.send_multipart([Header(Op.SHUTDOWN, req=1).pack()])  # not even a shutdown
        time.sleep(0.5)
        assert servers[0].is_alive()
        kv.wait(kv.pushpull(0, np.full(6, -2.0, np.float32), weights))  # the job's worker still trains
        np.testing.assert_array_equal(weights, np.full(6, 4.0, np.float32))
        kv.close()
        servers[0].terminate()
        servers[0].join(timeout=30)
        refused = [e for e in read_metrics(tmp_path / "server-0.jsonl") if e["event"] == "stopped"][-1]["refused"]
        assert set(refused) == {"handshake"} and refused["handshake"] >= 2  # never a message of theirs
    finally:
        plain.close()
        context.term()
        for proc in servers:
            proc.kill()
