"""Push+pull throughput of the parameter server against raw ZeroMQ bandwidth, same machine, same run.

    .venv/bin/python benchmarks/ps_throughput.py [--quick] [--piece-numel P] [--curve] [--replication] [--no-journal]

Reference: a DEALER client sends N bytes to a ROUTER process that echoes the frame back (zero-copy both ways): the
most a request/reply over ZeroMQ TCP on this machine can move. A second reference sends the same bytes cut into the
pieces Plait uses (one message each, all in flight), the like-for-like one where one huge message is slow. Plait: a
KVStore worker pushes N bytes of gradient to a server process (ASP, SGD applied to the shard) and pulls N bytes of
weights back with `pushpull`, as the trainer does: in pieces of at most 2 MiB, each piece's pull right behind its
push, so the server applies piece i while piece i+1 is on the wire. Both count 2N bytes per iteration, with the same
socket pattern (DEALER to ROUTER over TCP on 127.0.0.1) and the same zero-copy sends. The reference does strictly
less work: its server touches no bytes, and its client drops the reply where the KVStore copies it into the caller's
`out`. Rounds of the three (reference, 1 server, 2 servers) alternate in a rotating order; the ratio reported is the
median over rounds of each round's ratio (Plait's rate over the reference's in the same round), which cancels the
slow drifts of a shared machine that a ratio of two medians keeps. `--curve` runs both sides over CurveZMQ
(sync.curve_keys): compare its raw GB/s with a plain run's for the cost of encryption itself. `--replication` adds a
fourth side to every round: 1 server replicated (sync.replication = 2: a primary process that streams every piece's
gradient to its backup process and answers only once the backup has acknowledged it), reported against 1 server
unreplicated in the same round: the cost of replication.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import zmq

from plait.ps.consistency import ASP
from plait.ps.kvstore import KVStore
from plait.ps.optim import OptimizerConfig
from plait.ps.security import LAUNCHER, CurveKeys, make_keys
from plait.ps.server import run_server
from plait.ps.server_config import ServerConfig, message_limit, server_name
from plait.ps.sharding import DEFAULT_PIECE_NUMEL


def echo_server(port_queue, curve_keys: str) -> None:
    context = zmq.Context.instance()
    socket = context.socket(zmq.ROUTER)
    keys = CurveKeys.from_setting(curve_keys)
    if keys is not None:
        keys.secure_server(socket, context)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    port_queue.put(port)
    while True:
        frames = socket.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        socket.send_multipart(frames, copy=False)


def raw_round(socket: zmq.Socket, payload: np.ndarray, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        socket.send_multipart([b"h" * 52, payload], copy=False)
        frames = socket.recv_multipart(copy=False)
        np.frombuffer(frames[1].buffer, np.float32)  # the reply is received as the KVStore's is, then dropped
    return 2 * payload.nbytes * iterations / (time.perf_counter() - started)


def raw_pieces_round(socket: zmq.Socket, payload: np.ndarray, iterations: int, piece: int) -> float:
    """The reference cut as Plait cuts a key: one message per piece of at most `piece` elements, all in
    flight together. Large single messages are slow on this machine (one 40 MB buffer per receive), so at 1e7
    floats this, not the whole-message echo, is the like-for-like reference."""
    pieces = [payload[i : i + piece] for i in range(0, payload.size, piece)]
    started = time.perf_counter()
    for _ in range(iterations):
        for piece in pieces:
            socket.send_multipart([b"h" * 52, piece], copy=False)
        for _ in pieces:
            frames = socket.recv_multipart(copy=False)
            np.frombuffer(frames[1].buffer, np.float32)
    return 2 * payload.nbytes * iterations / (time.perf_counter() - started)


def ps_round(kv: KVStore, key: int, grad: np.ndarray, out: np.ndarray, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        kv.wait(kv.pushpull(key, grad, out))
    return 2 * grad.nbytes * iterations / (time.perf_counter() - started)


def start_ps(state_dir: str, num_servers: int, curve_keys: str, piece: int,
             replication: int = 1, journal: bool = True) -> tuple[list, list[str]]:
    """Server processes, replica 0 of every server then (replication 2) replica 1; their endpoints in that order.
    Their message limit is sync.max_message_bytes' auto value for these pieces."""
    ctx = mp.get_context("spawn")
    procs, endpoints = [], []
    names = [(index, replica) for replica in range(replication) for index in range(num_servers)]
    for index, replica in names:
        config = ServerConfig(index=index, endpoint="tcp://127.0.0.1:0", num_workers=1, consistency=ASP,
                              optimizer=OptimizerConfig(name="sgd", lr=1e-6), checkpoint_every=0,
                              state_dir=state_dir, resume=False, journal=journal, curve_keys=curve_keys,
                              replication=replication,
                              replica=replica, max_message_bytes=message_limit(0, piece))
        proc = ctx.Process(target=run_server, args=(config,), daemon=True)
        proc.start()
        procs.append(proc)
    for index, replica in names:
        path = Path(state_dir) / f"{server_name(index, replica)}.endpoint"
        while not path.exists():
            time.sleep(0.02)
        endpoints.append(path.read_text())
    for index in range(num_servers if replication > 1 else 0):  # the backups have joined: replies wait for them
        log = Path(state_dir) / f"{server_name(index, 1)}.jsonl"
        deadline = time.monotonic() + 60
        while '"synced"' not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError(f"backup replica of server {index} never synced")
            time.sleep(0.02)
    return procs, endpoints


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--piece-numel", type=int, default=DEFAULT_PIECE_NUMEL,
                        help="sync.piece_numel for Plait and the pieced raw reference")
    parser.add_argument("--curve", action="store_true",
                        help="CurveZMQ (sync.curve_keys) on Plait's sockets and on the raw reference's alike")
    parser.add_argument("--replication", action="store_true",
                        help="also 1 server with sync.replication = 2, against 1 server unreplicated")
    parser.add_argument("--no-journal", action="store_true",
                        help="servers without their journal (sync.journal = false): what durability costs")
    args = parser.parse_args()
    curve_keys = str(make_keys(Path(tempfile.mkdtemp(prefix="ps-keys-")) / "keys").directory) if args.curve else ""
    label = ", CurveZMQ" if args.curve else ""
    sizes = [100_000, 1_000_000, 4_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    rounds = 15 if args.quick else 25
    target_bytes = 200e6 if args.quick else 400e6  # per round

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    echo = ctx.Process(target=echo_server, args=(ports, curve_keys), daemon=True)
    echo.start()
    raw = zmq.Context.instance().socket(zmq.DEALER)
    if curve_keys:
        CurveKeys(Path(curve_keys)).secure_client(raw)
    raw.connect(f"tcp://127.0.0.1:{ports.get(timeout=30)}")
    state_dir = tempfile.mkdtemp(prefix="ps-throughput-")
    piece = args.piece_numel
    journal = not args.no_journal
    servers, endpoints = start_ps(state_dir, 1, curve_keys, piece, journal=journal)
    # The benchmark creates its keys itself: under CurveZMQ that takes the launcher's key (plait/ps/trust.py).
    keys = CurveKeys(Path(curve_keys), LAUNCHER) if curve_keys else None
    kv = KVStore(endpoints, 0, piece_numel=piece, curve_keys=keys)
    servers2, endpoints2 = start_ps(tempfile.mkdtemp(prefix="ps-throughput2-"), 2, curve_keys, piece, journal=journal)
    kv2 = KVStore(endpoints2, 0, piece_numel=piece, curve_keys=keys)
    servers_rep, kv_rep = [], None
    if args.replication:
        servers_rep, endpoints_rep = start_ps(tempfile.mkdtemp(prefix="ps-throughput-rep-"), 1, curve_keys, piece, 2)
        kv_rep = KVStore(endpoints_rep[:1], 0, piece_numel=piece, curve_keys=keys, backups=endpoints_rep[1:])

    lines = []
    for key, numel in enumerate(sizes):
        grad = np.random.default_rng(key).normal(size=numel).astype(np.float32)
        out = np.empty_like(grad)
        kv.init(key, grad)
        kv2.init(key, grad)
        if kv_rep is not None:
            kv_rep.init(key, grad)
            ps_round(kv_rep, key, grad, out, 2)
        iterations = max(3, int(target_bytes / (2 * grad.nbytes)))
        raw_round(raw, grad, 2)          # warm up connections and buffers
        ps_round(kv, key, grad, out, 2)
        ps_round(kv2, key, grad, out, 2)
        raw_rates, ps_rates, ps2_rates, pieces_rates, rep_rates = [], [], [], [], []
        # (where its rates go, one round of it), bound to this size's arrays
        runs = [(raw_rates, partial(raw_round, raw, grad, iterations)),
                (ps_rates, partial(ps_round, kv, key, grad, out, iterations)),
                (ps2_rates, partial(ps_round, kv2, key, grad, out, iterations)),
                (pieces_rates, partial(raw_pieces_round, raw, grad, iterations, piece or grad.size))]
        if kv_rep is not None:
            runs.append((rep_rates, partial(ps_round, kv_rep, key, grad, out, iterations)))
        for index in range(rounds):  # rotate the order, so none of them always runs first after a pause
            for rates, run in runs[index % len(runs):] + runs[:index % len(runs)]:
                rates.append(run())
        raw_gbs, ps_gbs, ps2_gbs = (statistics.median(r) / 1e9 for r in (raw_rates, ps_rates, ps2_rates))
        ratio1, ratio2 = (statistics.median(p / r for p, r in zip(rates, raw_rates)) for rates in (ps_rates, ps2_rates))
        print(f"{numel:>10} floats: raw ZeroMQ {raw_gbs:.2f} GB/s, PS 1 server {ps_gbs:.2f} GB/s "
              f"({ratio1:.2f}x), PS 2 servers {ps2_gbs:.2f} GB/s ({ratio2:.2f}x)", flush=True)
        pieces_gbs = statistics.median(pieces_rates) / 1e9
        ratio_pieces = statistics.median(p / r for p, r in zip(ps_rates, pieces_rates))
        print(f"{'':>10}         raw ZeroMQ in the same pieces {pieces_gbs:.2f} GB/s: PS 1 server {ratio_pieces:.2f}x",
              flush=True)
        lines.append({"benchmark": "ps_throughput", "metric": f"push+pull GB/s, {numel} floats, 1 server, vs raw "
                      f"ZeroMQ in the same {piece}-float pieces{label}", "plait": round(ps_gbs, 3),
                      "reference": round(pieces_gbs, 3), "ratio": round(ratio_pieces, 3), "goal": 0.7})
        for count, gbs, ratio in ((2, ps2_gbs, ratio2), (1, ps_gbs, ratio1)):
            lines.append({"benchmark": "ps_throughput", "metric": f"push+pull GB/s, {numel} floats, {count} "
                          f"server{'s' if count > 1 else ''}{label}", "plait": round(gbs, 3),
                          "reference": round(raw_gbs, 3),
                          "ratio": round(ratio, 3), "goal": 0.7})
        if rep_rates:
            rep_gbs = statistics.median(rep_rates) / 1e9
            ratio_rep = statistics.median(r / p for r, p in zip(rep_rates, ps_rates))
            print(f"{'':>10}         PS 1 server replicated (primary + backup) {rep_gbs:.2f} GB/s: "
                  f"{ratio_rep:.2f}x of 1 server unreplicated", flush=True)
            lines.append({"benchmark": "ps_throughput", "metric": f"push+pull GB/s, {numel} floats, 1 server "
                          f"replicated (sync.replication = 2) vs unreplicated{label}", "plait": round(rep_gbs, 3),
                          "reference": round(ps_gbs, 3), "ratio": round(ratio_rep, 3), "goal": None})

    kv.close()
    kv2.close()
    if kv_rep is not None:
        kv_rep.close()
    raw.send_multipart([b"x", b"stop"])
    for proc in servers + servers2 + servers_rep + [echo]:
        proc.kill()
    headline = next(line for line in lines if line["metric"] == f"push+pull GB/s, 1000000 floats, 1 server{label}")
    for line in lines:
        if line is not headline:
            print(json.dumps(line))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
