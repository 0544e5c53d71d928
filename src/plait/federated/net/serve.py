"""The network server's service: the gRPC service (`server.py`) and the status page run on one asyncio event loop,
while the driver runs the round loop (`round_loop.py`) in a thread, reaching the clients through `backend.py`.

    serve(config, run, drive)   drive(rounds, on_record) runs in that thread: the driver's rounds, metrics,
                                checkpoints and resume (`plait.experiment.runs.fl_server` hands it in)

Randomness comes from (seed, round, client) as in the simulator, so with the same clients connected a networked run
reproduces the simulation, and a resumed run the uninterrupted one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

from plait.data.federated import load_test_set
from plait.federated.components import build_model, build_task, check_model_fits
from plait.federated.net.backend import NetBackend
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.server import NetServer
from plait.federated.net.status import serve_status
from plait.federated.net.tls import server_credentials
from plait.federated.net.wire import grpc_options
from plait.federated.round_loop import RoundLoop, ServerState
from plait.federated.task import Task
from plait.federated.weights import flat_model_state
from plait.runtime.context import RunContext

log = logging.getLogger("plait.fl.server")

# Incoming calls gRPC core may queue before this process takes them: tens of thousands of clients.
_MAX_PENDING_RPCS = 100_000

OnRecord = Callable[[ServerState, dict[str, Any]], None]
# The driver's side: runs the rounds to the end, calling on_record after each round's record is written.
DriveRounds = Callable[[RoundLoop, OnRecord], None]


def serve(config: NetworkRunConfig, run: RunContext, drive: DriveRounds) -> None:
    """Serve clients until `drive` has run every round, then tell them the run is done (within `net.linger_s`)."""
    asyncio.run(_serve(config, run, drive))


async def _start_grpc(server: NetServer) -> grpc.aio.Server:
    net = server.config.net
    # grpc.aio takes incoming calls from gRPC core one at a time on this event loop; calls that arrive while it is
    # busy wait in core's queue of unrequested calls, and past grpc.server.max_pending_requests (default 1000;
    # randomly more of them up to the hard limit, default 3000) core refuses them with CANCELLED before any handler
    # runs. Every connected client can have a register, a heartbeat and a poll arriving at once (a server start,
    # synchronized heartbeats), so the queue must hold several calls per client.
    pending = [("grpc.server.max_pending_requests", _MAX_PENDING_RPCS),
               ("grpc.server.max_pending_requests_hard_limit", 2 * _MAX_PENDING_RPCS)]
    service = grpc.aio.server(options=grpc_options(net.chunk_bytes) + pending + [("grpc.so_reuseport", 0)])
    service.add_generic_rpc_handlers((server.handlers(),))
    address = f"[{net.host}]:{net.port}" if ":" in net.host else f"{net.host}:{net.port}"
    if net.use_tls:
        server.port = service.add_secure_port(address, server_credentials(net.cert_dir, net.client_certs))
    else:
        server.port = service.add_insecure_port(address)
    if not server.port:
        raise OSError(f"net.port: could not bind {address}")
    await service.start()
    return service


def _training_program(config: NetworkRunConfig, model: torch.nn.Module, task: Task, test) -> bytes:
    """net.ship_program: the model and task traced on a few of the server's test examples into the program file."""
    from plait.federated.shipping.trace import export_program

    if test is None or not len(test[1]):
        raise ValueError("net.ship_program needs the server's own test set (data.test_path, or a built-in data set's "
                         "test split): the model is traced on a few of its examples")
    started = time.perf_counter()
    program = export_program(model, task, test[0], test[1], config.model.label)
    if len(program) > config.net.max_program_bytes:
        raise ValueError(f"net.ship_program: the program is {len(program)} bytes, more than net.max_program_bytes = "
                         f"{config.net.max_program_bytes}, which clients refuse")
    log.info("traced the training program: %d bytes in %.1f s", len(program), time.perf_counter() - started)
    return program


async def _serve(config: NetworkRunConfig, run: RunContext, drive: DriveRounds) -> None:
    net = config.net
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    test = load_test_set(config.data)  # the server's own test set, if any: it reads no client's data
    num_classes = test[2] if test is not None else 0
    torch.manual_seed(config.run.seed)  # the initial global model, as the simulator draws it
    model, task = build_model(config.model, num_classes), build_task(config.fl)
    if test is not None and len(test[1]):
        check_model_fits(task, model, test[0], test[1], num_classes)
    initial, spec = flat_model_state(model, buffers=config.fl.buffers == "federated")
    program = _training_program(config, model, task, test) if net.ship_program else b""
    server = NetServer(config, initial.numel(), program=program)
    rounds = RoundLoop(config.fl, NetBackend(server, asyncio.get_running_loop()), model=model, spec=spec,
                       initial_params=initial, seed=config.run.seed, num_clients=config.data.num_clients,
                       test_set=(test[0], test[1]) if test is not None and len(test[1]) else None, task=task)
    service = await _start_grpc(server)
    httpd = None
    if net.status_port >= 0:
        httpd = await asyncio.to_thread(serve_status, server.board, net.status_host, net.status_port,
                                        net.status_connections, net.status_timeout_s)
        server.status_port = httpd.server_address[1]
    if run.writes:
        (run.path / "server.json").write_text(json.dumps(
            {"host": net.host, "port": server.port, "status_port": server.status_port, "pid": os.getpid(),
             "tls": net.use_tls}), encoding="utf-8")
    log.info("serving on %s:%d (%s, auth %s); status on http://%s:%d/", net.host, server.port,
             "TLS" if net.use_tls else "no TLS", net.auth, net.status_host, server.status_port)
    publisher = asyncio.create_task(server.publish_forever())

    def on_record(state: ServerState, record: dict[str, Any]) -> None:  # in the driver's thread
        server.rounds_done = state.round
        if record.get("target_reached"):
            log.info("round %d: test accuracy %.4f reached fl.target_accuracy, stopping", state.round,
                     record["test_accuracy"])
        elif record.get("stop"):
            log.info("round %d: privacy budget spent (epsilon %.3f), stopping", state.round,
                     record.get("epsilon", math.nan))
        else:
            log.info("round %d: %d/%d reported, %d dropped%s", state.round, record["participants"],
                     record["selected"], record["dropped"],
                     f", accuracy {record['test_accuracy']:.4f}" if "test_accuracy" in record else "")

    try:
        await asyncio.to_thread(drive, rounds, on_record)
        server.done, server.phase = True, "done"
        server.wake_pollers()
        linger_until = time.monotonic() + net.linger_s
        while time.monotonic() < linger_until and any(not c.told_done for c in server.alive().values()):
            await asyncio.sleep(0.05)
        server.board.publish(server.snapshot())
    finally:
        publisher.cancel()
        await service.stop(grace=1.0)
        if httpd is not None:
            httpd.shutdown()
