"""Load benchmark of the federated network server (`plait fl server`).

1. Many concurrent real gRPC clients: a real server process, and `--clients` lightweight clients (asyncio, one
   channel and TCP connection each, signed calls, heartbeats, long polls, the full model down and a full-size
   update up when selected, no local training) spread over `--procs` processes. Reported: clients connected at once,
   round latency (selection to aggregate, from the server's metrics), server memory (RSS, from its status page).
2. Model transfer on loopback: a float32 model streamed in Plait's chunked format (header + raw bytes, the client's
   real `Connection.get_task` / `push_update` path with its checks) against raw TCP socket throughput measured in
   the same run between two processes in the same layout (a sender and a receiver process).

    .venv/bin/python benchmarks/fl_load.py --quick          # 1000 clients, 3 rounds, 64 MiB transfers
    .venv/bin/python benchmarks/fl_load.py --clients 2000   # more clients, 5 rounds, 256 MiB transfers
    .venv/bin/python benchmarks/fl_load.py --quick --transfer-only   # part 2 alone

Part 2 reports two like-for-like pairs, alternated 3 times in one run: downloads into a fresh tensor each time
against a raw receiver allocating a fresh buffer each time, and downloads into one reused tensor (what
`plait fl client` does) against a raw receiver reusing its buffer (the transfer headline). Same bytes (the same
float32 values), same direction (sender process to receiver process), one TCP connection each.

The last line is the headline JSON (concurrent clients against the goal of 1000; with --transfer-only, the
transfer ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import derive_client_key, sign
from plait.federated.net.config import NetSection
from plait.federated.net.connection import Connection, Task
from plait.federated.net.local import fetch_status, small_config, start_server, stop, wait_for_server, write_config
from plait.federated.net.wire import (
    SERVICE,
    TensorAssembler,
    byte_view,
    check_header,
    chunk_data,
    chunk_parser,
    grpc_options,
    safe_parser,
    serialize,
    tensor_data_chunks,
)

NUMEL_2NN = 199_210


# ---- 1. many lightweight clients ----------------------------------------------------------------------------------
class LightClient:
    def __init__(self, address: str, cid: int, key: bytes, heartbeat_s: float):
        self.cid, self.key, self.heartbeat_s = cid, key, heartbeat_s
        self.channel = grpc.aio.insecure_channel(address, options=grpc_options(1 << 20))
        ser = serialize
        self.register = self.channel.unary_unary(f"/{SERVICE}/Register", ser, pb.RegisterReply.FromString)
        self.beat = self.channel.unary_unary(f"/{SERVICE}/Heartbeat", ser, pb.HeartbeatReply.FromString)
        self.get_task = self.channel.unary_stream(f"/{SERVICE}/GetTask", ser, chunk_parser(pb.TaskChunk))
        self.push = self.channel.stream_unary(f"/{SERVICE}/PushUpdate", ser, pb.PushReply.FromString)
        self.session = ""
        self.errors: dict[str, int] = {}

    async def _heartbeats(self) -> None:
        # A random phase: clients that registered together would otherwise all beat in the same instant.
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat(pb.HeartbeatRequest(client_id=self.cid, session=self.session),
                                metadata=sign(self.key, "Heartbeat", self.cid), timeout=30)
            except grpc.aio.AioRpcError:
                pass

    def _count(self, err: grpc.aio.AioRpcError) -> None:
        self.errors[err.code().name] = self.errors.get(err.code().name, 0) + 1

    async def _register(self) -> pb.RegisterReply:
        props = pb.Properties(charging=True, idle=True, unmetered=True)
        for attempt in range(100):
            try:
                reply = await self.register(pb.RegisterRequest(client_id=self.cid, properties=props, num_examples=600),
                                            metadata=sign(self.key, "Register", self.cid), timeout=60)
                self.session = reply.session
                return reply
            except grpc.aio.AioRpcError as err:
                self._count(err)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        raise ConnectionError(f"client {self.cid}: could not register")

    async def _round_trip(self, num_params: int) -> int:
        """One long poll, and the push when it brings a task. Returns the task kind."""
        stream = self.get_task(pb.TaskRequest(client_id=self.cid, session=self.session, wait_s=20),
                               metadata=sign(self.key, "GetTask", self.cid), timeout=120)
        header, assembler = None, None
        async for chunk in stream:
            if header is None:
                header = chunk.header
                if header.kind != pb.TaskHeader.TRAIN:
                    break
                check_header(header.tensor, num_params, "task")
                assembler = TensorAssembler(header.tensor, "task")
            else:
                assembler.add(chunk_data(chunk, "task"))
        if header.kind == pb.TaskHeader.TRAIN:
            assembler.tensor()
            delta = torch.zeros(num_params)  # no training: the load is the protocol and the bytes
            h = pb.UpdateHeader(client_id=self.cid, session=self.session, round=header.round, task_id=header.task_id,
                                num_examples=600, train_loss=1.0, tensor=pb.TensorHeader(
                                    dtype="float32", shape=[num_params], num_bytes=num_params * 4))
            chunks = [pb.UpdateChunk(header=h)] + list(tensor_data_chunks(delta, 1 << 20))
            await self.push(iter(chunks), metadata=sign(self.key, "PushUpdate", self.cid), timeout=120)
        return header.kind

    async def run(self) -> tuple[int, dict[str, int]]:
        """Until the server says DONE; failed calls are retried as the real client does. Returns (rounds, errors)."""
        reply = await self._register()
        beats = asyncio.create_task(self._heartbeats())
        rounds = 0
        try:
            while True:
                try:
                    kind = await self._round_trip(reply.num_params)
                except grpc.aio.AioRpcError as err:
                    self._count(err)
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        reply = await self._register()
                    else:
                        await asyncio.sleep(1.0)
                    continue
                if kind == pb.TaskHeader.DONE:
                    return rounds, self.errors
                rounds += kind == pb.TaskHeader.TRAIN
        finally:
            beats.cancel()
            await self.channel.close()


async def swarm(address: str, first: int, count: int, master: bytes, heartbeat_s: float) -> None:
    clients = [LightClient(address, cid, derive_client_key(master, cid), heartbeat_s)
               for cid in range(first, first + count)]
    results = await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    errors: dict[str, int] = {}
    for result in results:
        if not isinstance(result, BaseException):
            for code, n in result[1].items():
                errors[code] = errors.get(code, 0) + n
    print(json.dumps({"swarm": first, "clients": count, "failed": len(failed), "retried_errors": errors,
                      "error": repr(failed[0]) if failed else None}), flush=True)


def load_test(num_clients: int, procs: int, rounds: int, workdir: Path) -> dict:
    master = secrets.token_bytes(32)
    (workdir / "server.secret").write_text(master.hex())
    raw = small_config(workdir / "runs", name="load", num_clients=num_clients, rounds=rounds, auth="hmac",
                       secret_file=str(workdir / "server.secret"), heartbeat_s=5.0, heartbeat_timeout_s=60.0,
                       poll_s=20.0, wait_timeout_s=30.0, linger_s=10.0, round_timeout_s=300.0)
    raw["data"]["partition"] = "iid"
    raw["fl"].update(fraction=0.1, min_clients=max(2, num_clients // 20))
    config = write_config(workdir / "load.toml", raw)
    server = start_server(config, workdir / "server.log")
    swarms, peak_rss, peak_connected = [], 0.0, 0
    try:
        info = wait_for_server(workdir / "runs" / "load", server, timeout=120)
        idle_rss = fetch_status("127.0.0.1", info["status_port"])["rss_mib"]
        per = -(-num_clients // procs)
        started = time.perf_counter()
        for p in range(procs):
            count = min(per, num_clients - p * per)
            swarms.append(subprocess.Popen(
                [sys.executable, __file__, "--swarm", f"127.0.0.1:{info['port']}", str(p * per), str(count),
                 master.hex()], stdout=subprocess.PIPE, text=True))
        connect_s = None
        while server.poll() is None and time.perf_counter() - started < 900:
            try:
                status = fetch_status("127.0.0.1", info["status_port"])
            except OSError:
                break
            peak_rss = max(peak_rss, status["rss_mib"])
            peak_connected = max(peak_connected, status["connected"])
            if connect_s is None and status["connected"] >= num_clients:
                connect_s = time.perf_counter() - started
            time.sleep(0.5)
        server.wait(timeout=60)
        outputs = [json.loads(s.communicate(timeout=120)[0].strip().splitlines()[-1]) for s in swarms]
    finally:
        for process in [server, *swarms]:
            stop(process)
    records = [json.loads(line) for line in (workdir / "runs" / "load" / "metrics.jsonl").read_text().splitlines()]
    # The server's own count at each round's selection is exact; the status page is only sampled.
    peak_connected = max([peak_connected] + [r["connected"] for r in records])
    return {"clients": num_clients, "procs": procs, "peak_connected": peak_connected,
            "all_connected_after_s": connect_s, "rounds": len(records),
            "selected_per_round": [r["selected"] for r in records],
            "participants_per_round": [r["participants"] for r in records],
            "round_latency_s": [round(r["wall_s"], 3) for r in records],
            "lost_per_round": [r.get("lost", 0) for r in records],
            "server_rss_idle_mib": round(idle_rss, 1), "server_rss_peak_mib": round(peak_rss, 1),
            "client_failures": sum(o["failed"] for o in outputs),
            "client_retried_errors": {code: sum(o["retried_errors"].get(code, 0) for o in outputs)
                                      for code in sorted({c for o in outputs for c in o["retried_errors"]})},
            "client_errors": [o["error"] for o in outputs if o["error"]]}


# ---- 2. model transfer vs raw socket ------------------------------------------------------------------------------
async def transfer_server(num_bytes: int, chunk_bytes: int) -> None:
    """GetTask streams `num_bytes` of weights; PushUpdate assembles them; the real server's wire code on both paths
    (weights serialized into data chunks once, as once per round, and sent to every request; updates parsed with
    the chunk parser into a fresh buffer and checked)."""
    numel = num_bytes // 4
    payload = list(tensor_data_chunks((torch.arange(numel) % 65536).float(), chunk_bytes))  # exact in float32
    header = pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=1, task_id="t", plan=pb.Plan(
        epochs=1, batch_size=10, lr=0.1), tensor=pb.TensorHeader(dtype="float32", shape=[numel], num_bytes=num_bytes)))

    async def get_task(request, context):
        yield header
        for chunk in payload:
            yield chunk

    async def push(request_iterator, context):
        assembler = None
        async for chunk in request_iterator:
            if assembler is None:
                check_header(chunk.header.tensor, numel, "push")
                assembler = TensorAssembler(chunk.header.tensor, "push")
            else:
                assembler.add(chunk_data(chunk, "push"))
        assembler.tensor()
        return pb.PushReply(accepted=True)

    server = grpc.aio.server(options=grpc_options(chunk_bytes))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "GetTask": grpc.unary_stream_rpc_method_handler(get_task, safe_parser(pb.TaskRequest), serialize),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(push, chunk_parser(pb.UpdateChunk), serialize)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def raw_socket_receiver(num_bytes: int, repeats: int, fresh: bool) -> None:
    """Receives `repeats` transfers into one reused buffer, or (`fresh`) into a new buffer each time, as a
    receiver that hands the bytes on must."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    buffer = torch.empty(num_bytes, dtype=torch.uint8)
    for _ in range(repeats):
        if fresh:
            buffer = torch.empty(num_bytes, dtype=torch.uint8)
        view, got = memoryview(buffer.numpy()), 0
        while got < num_bytes:
            n = conn.recv_into(view[got:], min(num_bytes - got, 1 << 22))
            if not n:
                raise ConnectionError("sender closed early")
            got += n
        conn.sendall(b"k")  # one byte back: the transfer is complete on the receiving side


def _spawn(mode: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, __file__, *mode], stdout=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())


def raw_socket(num_bytes: int, repeats: int, fresh: bool) -> list[float]:
    """Seconds per transfer of `num_bytes` from this process to a receiver process over one TCP connection."""
    receiver, port = _spawn(["--raw-receiver", str(num_bytes), str(repeats + 1), str(int(fresh))])
    try:
        payload = (torch.arange(num_bytes // 4) % 65536).float()  # the same bytes as the model
        times = []
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for i in range(repeats + 1):
                t = time.perf_counter()
                sock.sendall(byte_view(payload))
                sock.recv(1)
                if i:  # the first is the warm-up
                    times.append(time.perf_counter() - t)
    finally:
        stop(receiver)
    return times


def grpc_transfer(num_bytes: int, repeats: int, chunk_bytes: int) -> dict[str, list[float]]:
    """Seconds per download (the client's `Connection.get_task`, into a fresh tensor and into a reused one) and
    per upload (`Connection.push_update`) of `num_bytes`, client in this process, server in another."""
    numel = num_bytes // 4
    grpc_server, port = _spawn(["--transfer-server", str(num_bytes), str(chunk_bytes)])
    times: dict[str, list[float]] = {"down": [], "down_reused": [], "up": []}
    try:
        conn = Connection(f"127.0.0.1:{port}", 0, None, chunk_bytes=chunk_bytes)
        out = torch.empty(numel)
        task = conn.get_task("s", 60, numel, out=out)  # warm-up: connection, allocator
        for _ in range(repeats):
            t = time.perf_counter()
            task = conn.get_task("s", 60, numel)
            times["down"].append(time.perf_counter() - t)
            t = time.perf_counter()
            task = conn.get_task("s", 60, numel, out=out)
            times["down_reused"].append(time.perf_counter() - t)
            t = time.perf_counter()
            conn.push_update("s", Task(1, "t", task.plan, task.params), task.params, 1, 0.0)
            times["up"].append(time.perf_counter() - t)
        assert isinstance(task, Task) and task.params[-1].item() == (numel - 1) % 65536
        conn.close()
    finally:
        stop(grpc_server)
    return times


def transfer_test(num_bytes: int, repeats: int, chunk_bytes: int) -> dict:
    """Plait's streams and the raw socket alternate, `repeats` times each per pass, over 3 passes, so that other
    load on the machine hits both alike; figures are medians over all passes."""
    times: dict[str, list[float]] = {"down": [], "down_reused": [], "up": [], "raw": [], "raw_fresh": []}
    for _ in range(3):
        for key, values in grpc_transfer(num_bytes, repeats, chunk_bytes).items():
            times[key] += values
        times["raw"] += raw_socket(num_bytes, repeats, fresh=False)
        times["raw_fresh"] += raw_socket(num_bytes, repeats, fresh=True)

    def gbps(key: str) -> float:
        return num_bytes / statistics.median(times[key]) / 1e9

    return {"bytes": num_bytes, "repeats": 3 * repeats, "chunk_bytes": chunk_bytes,
            "grpc_down_GBps": gbps("down"), "grpc_down_reused_GBps": gbps("down_reused"), "grpc_up_GBps": gbps("up"),
            "raw_socket_GBps": gbps("raw"), "raw_socket_fresh_GBps": gbps("raw_fresh")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--swarm":
        torch.set_num_threads(1)
        address, first, count, master = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bytes.fromhex(sys.argv[5])
        asyncio.run(swarm(address, first, count, master, heartbeat_s=5.0))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--transfer-server":
        torch.set_num_threads(1)  # as the client's process: on 2 cores, idle OpenMP threads spin against the peer
        asyncio.run(transfer_server(int(sys.argv[2]), int(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-receiver":
        raw_socket_receiver(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=0)
    parser.add_argument("--procs", type=int, default=4)
    chunk_default = next(f.default for f in dataclasses.fields(NetSection) if f.name == "chunk_bytes")
    parser.add_argument("--chunk-bytes", type=int, default=chunk_default)
    parser.add_argument("--transfer-only", action="store_true", help="skip the many-clients load test")
    args = parser.parse_args()
    num_clients = args.clients or (1000 if args.quick else 2000)
    rounds = 3 if args.quick else 5
    num_bytes = (64 if args.quick else 256) << 20
    torch.set_num_threads(1)
    transfer = transfer_test(num_bytes, repeats=3 if args.quick else 5, chunk_bytes=args.chunk_bytes)
    print(json.dumps({"transfer": transfer}), flush=True)
    # Like for like: a fresh tensor per model against a fresh buffer per transfer; the headline is what
    # `plait fl client` does (one receive buffer reused across rounds) against a raw receiver reusing its buffer.
    fresh = transfer["grpc_down_GBps"]
    print(json.dumps({"benchmark": "fl_load", "metric": "model_transfer_fresh_buffer_GBps_vs_raw_socket",
                      "plait": round(fresh, 3), "reference": round(transfer["raw_socket_fresh_GBps"], 3),
                      "ratio": round(fresh / transfer["raw_socket_fresh_GBps"], 3), "goal": 0.5}))
    down = transfer["grpc_down_reused_GBps"]
    headline = {"benchmark": "fl_load", "metric": "model_transfer_GBps_vs_raw_socket", "plait": round(down, 3),
                "reference": round(transfer["raw_socket_GBps"], 3),
                "ratio": round(down / transfer["raw_socket_GBps"], 3), "goal": 0.5}
    if args.transfer_only:
        print(json.dumps(headline))
        return
    with tempfile.TemporaryDirectory(prefix="fl_load") as tmp:
        load = load_test(num_clients, args.procs, rounds, Path(tmp))
    print(json.dumps({"load": load}), flush=True)
    print(json.dumps(headline))
    latency = statistics.median(load["round_latency_s"]) if load["round_latency_s"] else None
    print(json.dumps({"benchmark": "fl_load", "metric": "round_latency_s_median", "plait": latency,
                      "reference": None, "ratio": None, "goal": None}))
    print(json.dumps({"benchmark": "fl_load", "metric": "server_rss_peak_mib", "plait": load["server_rss_peak_mib"],
                      "reference": load["server_rss_idle_mib"], "ratio": None, "goal": None}))
    print(json.dumps({"benchmark": "fl_load", "metric": "concurrent_clients", "plait": load["peak_connected"],
                      "reference": None, "ratio": round(load["peak_connected"] / 1000, 3), "goal": 1000}))


if __name__ == "__main__":
    main()
