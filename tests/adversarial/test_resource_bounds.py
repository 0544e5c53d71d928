"""Resources a peer can pin on the FL server are bounded, each refusal counted: update streams open at once (per
client and in all), chunks per stream, cached keys, status-page connections and how long a request may take to
arrive (issue 14). Before: 20,000 empty chunks were accepted, every half-open stream held a model-sized buffer,
every unauthenticated call cached a key, and 300 slow connections held 301 threads."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import grpc
import pytest

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import Verifier, derive_client_key, sign
from plait.federated.net.connection import Connection
from plait.federated.net.local import (
    fetch_status,
    small_config,
    start_server,
    stop,
    wait_for_server,
    wait_until,
    write_config,
)
from plait.federated.net.status import StatusBoard, serve_status
from plait.federated.net.wire import WireError

NUMEL = 199_210


def test_keys_are_cached_only_for_clients_that_proved_them_and_the_cache_is_bounded():
    master = secrets.token_bytes(32)
    verifier = Verifier(master, 300.0, max_keys=3)
    for cid in range(1000):  # signed with the wrong key: refused, nothing remembered
        with pytest.raises(WireError):
            verifier.verify("Register", dict(sign(secrets.token_bytes(32), "Register", cid)), cid)
    assert verifier._keys == {}
    for cid in range(5):
        verifier.verify("Register", dict(sign(derive_client_key(master, cid), "Register", cid)), cid)
    assert sorted(verifier._keys) == [2, 3, 4]  # the oldest forgotten first; it can be derived again


def test_the_status_page_cuts_slow_readers_and_caps_connections():
    board = StatusBoard()
    board.publish({"run": "t"})
    httpd = serve_status(board, "127.0.0.1", 0, connections=2, timeout_s=0.5)
    port = httpd.server_address[1]
    try:
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # connect, send nothing
        time.sleep(0.2)
        assert httpd.turned_away >= 3  # only 2 are served at once; the rest are closed at once
        time.sleep(1.0)  # past the read timeout the 2 served are cut too
        assert fetch_status("127.0.0.1", port)["run"] == "t"  # and the page serves again
        assert threading.active_count() < 20
        for s in slow:
            s.close()
    finally:
        httpd.shutdown()


@pytest.mark.timeout(90)
def test_update_streams_are_bounded_per_client_and_empty_chunks_refused(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=2, rounds=1, wait_for_clients=2)
    raw["fl"].update(fraction=1.0, min_clients=1)
    path = write_config(tmp_path / "fl.toml", raw)
    server = start_server(path, tmp_path / "server.log")
    try:
        info = wait_for_server(tmp_path / "runs" / "net", server)
        address = f"127.0.0.1:{info['port']}"
        peers = {cid: Connection(address, cid, None) for cid in (0, 1)}
        sessions = {cid: c.register({"charging": True, "idle": True, "unmetered": True}, 10).session
                    for cid, c in peers.items()}
        tasks = {}
        for cid, conn in peers.items():  # both are selected: each gets a task
            for _ in range(30):
                tasks[cid] = conn.get_task(sessions[cid], 2.0, NUMEL)
                if hasattr(tasks[cid], "task_id"):
                    break

        def header(cid):
            return pb.UpdateChunk(header=pb.UpdateHeader(
                client_id=cid, session=sessions[cid], round=tasks[cid].round, task_id=tasks[cid].task_id,
                num_examples=10, train_loss=1.0, tensor=pb.TensorHeader(dtype="float32", shape=[NUMEL],
                                                                          num_bytes=NUMEL * 4)))

        # a stream of empty chunks is refused, not read forever
        with pytest.raises(grpc.RpcError) as err:
            peers[0].push_chunks([header(0)] + [pb.UpdateChunk(data=b"")] * 50, timeout=10)
        assert "an empty chunk" in err.value.details(), err.value.details()
        # two streams held open by one client: a third is refused at once
        gate = threading.Event()

        def held():
            yield header(1)
            gate.wait(20)  # the stream stays open in its data phase, holding a slot

        open_calls = [peers[1]._push.future(held(), timeout=30) for _ in range(2)]
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as err:
            peers[1].push_chunks([header(1)], timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details().startswith("busy: ")
        gate.set()
        for call in open_calls:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=20)  # their streams ended short: refused, slots released
        def counted():  # the page is refreshed a few times a second
            rejected = fetch_status("127.0.0.1", info["status_port"])["rejected"]
            return rejected["busy"] == 1 and rejected["malformed"] >= 2

        wait_until(counted, timeout=10, what="the refusals on the status page")
        for conn in peers.values():
            conn.close()
    finally:
        stop(server)
