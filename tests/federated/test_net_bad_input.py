"""A real server process keeps serving honest clients while one peer sends every kind of bad input: each gets a
clear error, is counted on the status page and in metrics, and the rounds still complete. A refused update ends that
client's task for its round (it is not sent the task again: no re-download and re-training storm). A client process
with the wrong key is refused and exits."""

from __future__ import annotations

import json
import math
import secrets

import grpc
import pytest
import torch

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import derive_client_key, sign
from plait.federated.net.client import EXIT_REFUSED
from plait.federated.net.connection import Connection, Task, raw_call
from plait.federated.net.local import (
    fetch_status,
    small_config,
    start_client,
    start_server,
    stop,
    wait_for_server,
    wait_until,
    write_config,
)
from plait.federated.net.wire import iter_chunks

ROGUE = 2
ROUNDS = 6  # five refused updates, each ending the rogue's task of one round, then an accepted one


def expect_refusal(call, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details(), err.value.details()


def update_chunks(conn: Connection, session: str, task: Task, delta: torch.Tensor, *, dtype: str = "float32",
                  shape=None, num_bytes=None, round_=None, task_id=None, extra: bytes = b""):
    header = pb.UpdateHeader(client_id=conn.client_id, session=session, round=task.round if round_ is None else round_,
                             task_id=task.task_id if task_id is None else task_id, num_examples=10, train_loss=1.0,
                             tensor=pb.TensorHeader(dtype=dtype, shape=list(delta.shape) if shape is None else shape,
                                                    num_bytes=delta.numel() * 4 if num_bytes is None else num_bytes))
    data = [pb.UpdateChunk(data=c) for c in iter_chunks(delta, 1 << 16)]
    return [pb.UpdateChunk(header=header), *data] + ([pb.UpdateChunk(data=extra)] if extra else [])


@pytest.mark.timeout(120)
def test_bad_inputs_are_refused_counted_and_others_served(tmp_path):
    master = secrets.token_bytes(32)
    (tmp_path / "server.secret").write_text(master.hex())
    (tmp_path / "wrong.key").write_text(secrets.token_bytes(32).hex())
    (tmp_path / "client-0.key").write_text(derive_client_key(master, 0).hex())
    (tmp_path / "client-1.key").write_text(derive_client_key(master, 1).hex())
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=ROUNDS, auth="hmac",
                       secret_file=str(tmp_path / "server.secret"), heartbeat_timeout_s=10.0)
    raw["fl"]["fraction"] = 1.0
    path = write_config(tmp_path / "fl.toml", raw)
    server = start_server(path, tmp_path / "server.log")
    procs = []
    try:
        info = wait_for_server(tmp_path / "runs" / "net", server)
        address = f"127.0.0.1:{info['port']}"
        procs = [start_client(path, address, cid, tmp_path / f"client{cid}.log",
                              extra=["--key", str(tmp_path / f"client-{cid}.key")])
                 for cid in (0, 1)]
        impostor = start_client(path, address, 0, tmp_path / "impostor.log",
                                extra=["--key", str(tmp_path / "wrong.key")])
        procs.append(impostor)

        # Unauthenticated, forged and replayed requests.
        anonymous = Connection(address, ROGUE, None)
        expect_refusal(lambda: anonymous.register({}, 5), grpc.StatusCode.UNAUTHENTICATED, "unsigned request")
        forged = Connection(address, ROGUE, secrets.token_bytes(32))
        expect_refusal(lambda: forged.register({}, 5), grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        rogue = Connection(address, ROGUE, derive_client_key(master, ROGUE))
        metadata = sign(rogue.key, "Register", ROGUE)
        request = pb.RegisterRequest(client_id=ROGUE, num_examples=10,
                                     properties=pb.Properties(charging=True, idle=True, unmetered=True))
        session = rogue._register(request, metadata=metadata, timeout=10).session
        expect_refusal(lambda: rogue._register(request, metadata=metadata, timeout=10),
                       grpc.StatusCode.UNAUTHENTICATED, "replay")
        # Malformed protobuf.
        garbage = b"\x0a\xff\xff\xff"
        expect_refusal(lambda: raw_call(rogue.channel, "Register", garbage, sign(rogue.key, "Register", ROGUE)),
                       grpc.StatusCode.INVALID_ARGUMENT, "malformed")

        def next_task(after: int) -> Task:  # the rogue is selected every round with the honest clients
            for _ in range(60):
                got = rogue.get_task(session, 2.0, 199_210)
                if isinstance(got, Task) and got.round > after:
                    return got
            raise AssertionError(f"the rogue got no task after round {after}")

        task = next_task(0)
        good = torch.zeros(task.params.numel())
        nan = good.clone()
        nan[5] = math.nan
        # Refusals that reach no open task of the rogue's leave its task as it is.
        not_a_task = [
            ("stale", update_chunks(rogue, session, task, good, round_=task.round - 1), "server is at round"),
            ("stale", update_chunks(rogue, session, task, good, task_id="0" * 16), "not this client's task"),
            ("malformed", [pb.UpdateChunk(data=b"x")], "first message must be"),
        ]
        for reason, chunks, text in not_a_task:
            code = grpc.StatusCode.FAILED_PRECONDITION if reason == "stale" else grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:
                rogue.push_chunks(chunks, timeout=30)
            assert err.value.code() == code, err.value.details()
            assert err.value.details().startswith(f"{reason}: ") and text in err.value.details(), err.value.details()
        # Each refused update ends the rogue's task for that round: asking again brings no task of the same round.
        ending = [
            ("shape", lambda t: update_chunks(rogue, session, t, good[:-1]), "shape [199209]"),
            ("dtype", lambda t: update_chunks(rogue, session, t, good, dtype="float64", num_bytes=good.numel() * 8),
             "float64"),
            ("nonfinite", lambda t: update_chunks(rogue, session, t, nan), "1 NaN/Inf"),
            ("oversized", lambda t: update_chunks(rogue, session, t, good, extra=bytes(4096)), "more than the"),
            ("oversized", lambda t: update_chunks(rogue, session, t, good, num_bytes=1 << 40), "declares"),
        ]
        refused_rounds = []
        for reason, make, text in ending:
            with pytest.raises(grpc.RpcError) as err:
                rogue.push_chunks(make(task), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(f"{reason}: ") and text in err.value.details(), err.value.details()
            again = rogue.get_task(session, 0.5, 199_210)
            assert not (isinstance(again, Task) and again.round == task.round), "a refused task was sent again"
            refused_rounds.append(task.round)
            task = again if isinstance(again, Task) else next_task(task.round)

        def counted():  # the page is refreshed a few times a second; the impostor process may still be starting
            page = fetch_status("127.0.0.1", info["status_port"])
            rejected = page["rejected"]
            expected = {"malformed": 2, "shape": 1, "dtype": 1, "nonfinite": 1, "oversized": 2, "stale": 2}
            everything = all(rejected[k] == n for k, n in expected.items())
            return page if everything and rejected["unauthenticated"] >= 3 else None

        status = wait_until(counted, timeout=45, what="refusals on the status page")
        html = fetch_status("127.0.0.1", info["status_port"], "/")
        # Execute the honest path last: the rogue's good update is still accepted, the last round completes.
        reply = rogue.push_update(session, task, good, 10, 1.0)
        assert reply.accepted, reply.message
        done = rogue.get_task(session, 5.0, 199_210)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()
        codes = [p.wait(timeout=30) for p in procs]
    finally:
        for process in [server, *procs]:
            stop(process)
    assert isinstance(done, pb.TaskHeader) and done.kind == pb.TaskHeader.DONE
    assert codes[:2] == [0, 0], [(tmp_path / f"client{c}.log").read_text()[-2000:] for c in (0, 1)]
    assert codes[2] == EXIT_REFUSED, (tmp_path / "impostor.log").read_text()[-2000:]
    assert "bad signature for client 0" in (tmp_path / "impostor.log").read_text()
    # Counted: refusals on the status page (all since start) and in the round's metrics line.
    rejected = status["rejected"]
    assert rejected["shape"] == 1 and rejected["dtype"] == 1 and rejected["nonfinite"] == 1
    assert rejected["oversized"] == 2 and rejected["stale"] == 2 and rejected["malformed"] == 2
    assert rejected["replay"] == 1 and rejected["unauthenticated"] >= 3  # 2 here + the impostor's attempt(s)
    assert ROGUE in status["current"]["selected"]
    assert "plait federated server" in html
    records = [json.loads(line) for line in (tmp_path / "runs" / "net" / "metrics.jsonl").read_text().splitlines()]
    assert refused_rounds == [1, 2, 3, 4, 5] and task.round == ROUNDS
    # every refused update cost its round one participant, counted once, with its reason
    assert [(r["participants"], r["refused"]) for r in records] == [(2, 1)] * 5 + [(3, 0)]
    assert records[0]["rejected_shape"] == 1 and records[0]["rejected_stale"] == 2
    assert records[2]["rejected_nonfinite"] == 1 and records[4]["rejected_oversized"] == 1
