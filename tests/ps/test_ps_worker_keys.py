"""Worker ids bound to CurveZMQ keys (issue 14): a worker's key speaks for its own worker id only. Before, any key
in authorized/ could push, pull or take part in the clocks under any worker id. Real server processes and raw
ZeroMQ peers on 127.0.0.1, bounded waits."""

import stat

import numpy as np
import pytest
import zmq
from test_ps_consistency import start_servers
from test_ps_hostile import answers, raw_peer, stop

from plait.ps.kvstore import KVStore
from plait.ps.security import CLIENT, LAUNCHER, CurveKeys, issue_worker_keys, make_keys
from plait.ps.wire import Flag, Header, Op

VALUES = np.full(4, -1.0, np.float32).tobytes()


def test_plait_ps_keys_binds_one_key_to_each_worker_id(tmp_path):
    from plait.cli import app

    app(["ps", "keys", str(tmp_path / "keys"), "--workers", "2"])
    keys = CurveKeys(tmp_path / "keys")
    assert sorted(keys.worker_bindings().values()) == [0, 1]
    assert (tmp_path / "keys" / "authorized" / "worker-1.key").is_file()
    assert stat.S_IMODE((tmp_path / "keys" / "worker-0.key_secret").stat().st_mode) == 0o600
    # a worker presents its own key where the directory has one; an evaluator (-1) or an unkeyed rank the shared one
    assert [keys.for_worker(rank).identity for rank in (0, 1, 2, -1)] == ["worker-0", "worker-1", CLIENT, CLIENT]
    # the local launcher issues only what is missing
    assert issue_worker_keys(tmp_path / "keys", 3) == [2] and issue_worker_keys(tmp_path / "keys", 3) == []
    assert sorted(keys.worker_bindings().values()) == [0, 1, 2]
    # a directory made without worker keys binds nothing (the old rule); a binding's name must say its id
    old = make_keys(tmp_path / "old").directory
    assert CurveKeys(old).worker_bindings() == {}
    (old / "workers" / "someone.key").write_text((old / "client.key").read_text())
    with pytest.raises(ValueError, match="not named worker-<rank>.key"):
        CurveKeys(old).worker_bindings()


def test_a_worker_key_speaks_for_its_own_worker_id_only(tmp_path):
    """Worker 0's key under worker id 1 (INIT, PUSH, PULL, PUSHPULL) and the shared client key under any id are
    refused with an ERROR, counted, and change nothing; an observer's pull with the client key, worker 0 as itself
    and the launcher's key under any id are served."""
    keys = make_keys(tmp_path / "keys", workers=2).directory
    servers, endpoints = start_servers(tmp_path, 1, "asp", num_workers=2, curve_keys=str(keys))
    context = zmq.Context()
    impostor = raw_peer(context, endpoints[0], keys, "worker-0")
    shared = raw_peer(context, endpoints[0], keys, CLIENT)
    boss = raw_peer(context, endpoints[0], keys, LAUNCHER)
    try:
        seeder = KVStore(endpoints, -1, timeout_s=20.0, curve_keys=CurveKeys(keys, LAUNCHER))
        seeder.init(0, np.ones(4, np.float32))
        seeder.close(goodbye=False)
        impostor.send_multipart([Header(Op.INIT, worker=1, key=0, req=1, numel=4).pack(), VALUES])
        impostor.send_multipart([Header(Op.PUSH, worker=1, key=0, clock=0, req=2, numel=4).pack(), VALUES])
        impostor.send_multipart([Header(Op.PULL, worker=1, key=0, clock=0, req=3, numel=4).pack()])
        impostor.send_multipart([Header(Op.PUSHPULL, worker=1, key=0, clock=0, req=4, numel=4).pack(), VALUES])
        found = answers(impostor, 4)
        assert all(op == Op.ERROR and "as worker 1 from worker 0's key" in text for op, text in found.values())
        shared.send_multipart([Header(Op.PUSH, worker=0, key=0, clock=0, req=5, numel=4).pack(), VALUES])
        shared.send_multipart([Header(Op.PULL, worker=0, key=0, clock=0, req=6, numel=4).pack()])
        found = answers(shared, 2)
        assert all(op == Op.ERROR and "bound to no worker id" in text for op, text in found.values())
        shared.send_multipart([Header(Op.PULL, key=0, req=7, numel=4, flags=Flag.OBSERVER).pack()])
        assert shared.poll(10_000)
        header_frame, values = shared.recv_multipart()  # the evaluator reads with the shared key: the ones
        assert Header.unpack(header_frame).op == Op.VALUE and np.frombuffer(values, np.float32).tolist() == [1.0] * 4
        # Worker 0 (its KVStore presents worker-0.key) trains on the launcher's ones: nothing refused was applied.
        kv = KVStore(endpoints, 0, timeout_s=20.0, curve_keys=keys)
        assert kv.curve is not None and kv.curve.identity == "worker-0"
        weights = np.zeros(4, np.float32)
        kv.init(0, weights)
        kv.wait(kv.pushpull(0, np.full(4, -1.0, np.float32), weights))
        np.testing.assert_array_equal(weights, np.full(4, 1.5, np.float32))  # ASP, 2 workers: lr 1 / 2 per push
        kv.close()
        boss.send_multipart([Header(Op.PUSH, worker=1, key=0, clock=0, req=8, numel=4).pack(), VALUES])
        assert answers(boss, 1)[8][0] == Op.ACK  # a control key may speak for any worker
        events = stop(servers[0], tmp_path / "server-0.jsonl")
    finally:
        for socket in (impostor, shared, boss):
            socket.close()
        context.term()
        for proc in servers:
            proc.kill()
    assert events[-1]["event"] == "stopped" and events[-1]["refused"] == {"unauthorised": 6}
