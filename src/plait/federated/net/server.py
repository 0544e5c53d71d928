"""The network server: `plait fl server CONFIG.toml [--resume]`.

One asyncio process runs the gRPC service (clients register, beat, long-poll for their task, stream their update
back) and the round loop built from the simulator's pieces: select among connected clients by their reported
properties → broadcast weights and per-client plans → collect until the target, the quorum of live clients, or the
deadline (stragglers and silent clients dropped in real time) → aggregate (make_aggregator) → server optimizer →
evaluate → metrics line and atomic checkpoint. Randomness comes from (seed, round, client) as in the simulator, so
with the same clients connected a networked run reproduces the simulation, and a resumed run the uninterrupted one.

The update pipeline runs as in the simulator: clients compress / add local-DP noise (`pipeline.py`), the server
decompresses, central DP wraps the aggregator and ε is accounted per round (stop at the budget); with
`fl.strategy.name = "secagg"` the round is the secure-aggregation protocol of `secagg_round.py` instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from plait.core.compress import Encoded
from plait.core.flat import flat_params
from plait.core.models import build_model
from plait.data.federated import load_federated
from plait.experiment.checkpoint import load_checkpoint, save_checkpoint
from plait.experiment.metrics import MetricsLog, read_metrics, truncate_metrics
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.federated.client_update import Update
from plait.federated.evaluate import evaluate
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import Verifier, read_key
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.pipeline import pipeline_fingerprint
from plait.federated.net.round_state import ClientInfo, RoundState
from plait.federated.net.secagg_round import TRAIN, SecAggRound
from plait.federated.net.status import StatusBoard, serve_status
from plait.federated.net.tls import server_credentials
from plait.federated.net.wire import REASONS, SERVICE, DataChunk, Malformed, TensorAssembler, WireError, \
    check_header, check_parts, chunk_data, chunk_parser, data_chunks, grpc_options, safe_parser, serialize, \
    split_parts, tensor_data_chunks
from plait.federated.pipeline import ClientStages
from plait.federated.privacy.rounds import RoundPrivacy
from plait.federated.secagg.aggregator import weighted_mean
from plait.federated.secagg.messages import MaskedInput
from plait.federated.secagg.protocol import SecAggError
from plait.federated.selection import requires, select_clients
from plait.federated.seeds import client_seed
from plait.federated.server import ServerState
from plait.federated.server_opt import build_server_opt
from plait.federated.strategy import make_aggregator

log = logging.getLogger("plait.fl.server")

# Incoming calls gRPC core may queue before this process takes them (see serve): tens of thousands of clients.
_MAX_PENDING_RPCS = 100_000

_CODES = {"stale": grpc.StatusCode.FAILED_PRECONDITION, "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
          "replay": grpc.StatusCode.UNAUTHENTICATED}


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NetServer:
    def __init__(self, config: NetworkRunConfig, resume: bool = False):
        self.config, net = config, config.net
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.run = prepare_run_dir(config.run.root, config.run.name, resume)
        data = load_federated(config.data)  # the server keeps only the central test set
        self.test_x, self.test_y = data.test_x, data.test_y
        torch.manual_seed(config.run.seed)  # the initial global model, as the simulator draws it
        extra = {"vocab_size": data.num_classes} if config.model.name == "char_lstm" else {}
        self.model = build_model(config.model.name, **extra)
        initial, self.spec = flat_params(self.model)
        self.numel = initial.numel()
        self.server_opt = build_server_opt(config.fl.server_opt)
        # the update pipeline: decompression here, clients run the encoding half; central DP and ε as simulated
        self.stages = ClientStages(config.fl.privacy, config.fl.compression, config.run.seed)
        self.privacy = RoundPrivacy(config.fl, config.run.seed, data.num_clients)
        if config.fl.strategy.name == "secagg" and config.fl.strategy.weighting == "examples":
            config.fl.strategy.secagg.check_weights(max(data.num_examples(c) for c in range(data.num_clients)))
        self.fingerprint = pipeline_fingerprint(config.fl)
        if resume:
            ckpt = load_checkpoint(self.run.checkpoint_path)
            if ckpt["params"].shape != initial.shape:
                raise ValueError(f"{self.run.checkpoint_path} holds {ckpt['params'].numel()} parameters, the model "
                                 f"has {self.numel}: was the config's model changed?")
            truncate_metrics(self.run.metrics_path, "round", ckpt["round"])  # later rounds are redone once
            self.state = ServerState(ckpt["round"], ckpt["params"], ckpt["opt_state"])
        else:
            self.run.write_config(config)
            self.state = ServerState(0, initial.clone(), self.privacy.init_state(self.server_opt.init(initial)))
        self.history = [{k: r.get(k) for k in ("round", "accuracy", "loss", "participants", "dropped")}
                        for r in read_metrics(self.run.metrics_path)]
        master = None
        if net.auth == "hmac":
            master = read_key(net.secret_file or Path(net.cert_dir) / "server.secret", "net.secret_file")
        self.verifier = Verifier(master, net.replay_window_s)
        self.eligible = requires(**config.fl.eligibility)
        self.clients: dict[int, ClientInfo] = {}
        self.round: RoundState | None = None
        self.done = False
        self.rejected: Counter[str] = Counter()        # since this process started
        self.round_rejected: Counter[str] = Counter()  # in the current round
        self.board = StatusBoard()
        self.phase = "starting"
        self.port = self.status_port = 0
        self._wakeup: asyncio.Event | None = None

    # ---- gRPC plumbing -------------------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        ser = serialize  # protobuf messages, and data chunks serialized once per round (wire.data_chunks)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Register": grpc.unary_unary_rpc_method_handler(
                self.register, request_deserializer=safe_parser(pb.RegisterRequest), response_serializer=ser),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self.heartbeat, request_deserializer=safe_parser(pb.HeartbeatRequest), response_serializer=ser),
            "GetTask": grpc.unary_stream_rpc_method_handler(
                self.get_task, request_deserializer=safe_parser(pb.TaskRequest), response_serializer=ser),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                self.push_update, request_deserializer=chunk_parser(pb.UpdateChunk), response_serializer=ser),
            "SecAggPush": grpc.stream_unary_rpc_method_handler(
                self.push_secagg, request_deserializer=chunk_parser(pb.SecAggChunk), response_serializer=ser),
        })

    async def _refuse(self, context, err: WireError, who: str) -> None:
        """Answer this client with a clear error, count it, and keep serving everyone else."""
        self.rejected[err.reason] += 1
        self.round_rejected[err.reason] += 1
        log.warning("refused %s: %s (%s)", who, err, err.reason)
        await context.abort(_CODES.get(err.reason, grpc.StatusCode.INVALID_ARGUMENT), f"{err.reason}: {err}")

    async def _authenticate(self, context, method: str, request) -> int:
        if isinstance(request, Malformed):
            await self._refuse(context, WireError("malformed", f"{method}: not a {request.type_name} message "
                                                               f"({request.error})"), "a peer")
        cid = request.client_id
        try:
            metadata = {m[0]: m[1] for m in context.invocation_metadata() or ()}
            self.verifier.verify(method, metadata, cid)
            if self.config.net.client_certs:
                names = (context.auth_context() or {}).get("x509_common_name", [])
                if f"client-{cid}".encode() not in names:
                    raise WireError("unauthenticated", f"{method}: TLS certificate {names} is not client-{cid}'s")
        except WireError as err:
            await self._refuse(context, err, f"client {cid}")
        return cid

    async def _session(self, context, cid: int, session: str) -> ClientInfo:
        info = self.clients.get(cid)
        if info is None or info.session != session:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"client {cid}: unknown session, register again")
        info.last_seen = time.monotonic()
        return info

    def _wake_pollers(self) -> None:
        old, self._wakeup = self._wakeup, asyncio.Event()
        if old is not None:
            old.set()

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def register(self, request, context):
        cid = await self._authenticate(context, "Register", request)
        props = {k: getattr(request.properties, k) for k in ("charging", "idle", "unmetered")}
        previous = self.clients.get(cid)
        self.clients[cid] = ClientInfo(secrets.token_hex(8), props, request.num_examples, time.monotonic())
        log.info("client %d %s (%d examples)", cid, "re-registered" if previous else "registered",
                 request.num_examples)
        return pb.RegisterReply(session=self.clients[cid].session, heartbeat_s=self.config.net.heartbeat_s,
                                model=self.config.model.name, num_params=self.numel, pipeline=self.fingerprint)

    async def heartbeat(self, request, context):
        cid = await self._authenticate(context, "Heartbeat", request)
        info = self.clients.get(cid)
        if info is None or info.session != request.session:
            return pb.HeartbeatReply(known=False, round=self.state.round)
        info.last_seen = time.monotonic()
        if request.HasField("properties"):
            info.properties = {k: getattr(request.properties, k) for k in ("charging", "idle", "unmetered")}
        return pb.HeartbeatReply(known=True, round=self.state.round)

    async def get_task(self, request, context):
        cid = await self._authenticate(context, "GetTask", request)
        info = await self._session(context, cid, request.session)
        wait_s = min(request.wait_s, self.config.net.poll_s) if request.wait_s > 0 else self.config.net.poll_s
        deadline = time.monotonic() + wait_s
        while True:
            wakeup = self._wakeup
            info.last_seen = time.monotonic()  # a client held in a poll is alive
            if self.done:
                info.told_done = True
                yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.DONE, round=self.state.round))
                return
            rnd = self.round
            if rnd is not None and rnd.waiting_on(cid):
                item = rnd.secagg.next_item(cid) if rnd.secagg is not None else TRAIN
                if item is not TRAIN:  # a secure-aggregation message of this round
                    rnd.secagg.sent(cid, item)
                    yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.SECAGG, round=rnd.idx,
                                                            task_id=rnd.task_ids[cid], secagg_bytes=len(item)))
                    for chunk in data_chunks(item, self.config.net.chunk_bytes):
                        yield chunk
                    return
                async for chunk in self._stream_task(rnd, cid):
                    yield chunk
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.WAIT, round=self.state.round))
                return
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _stream_task(self, rnd: RoundState, cid: int):
        plan = rnd.plans[cid]
        header = pb.TaskHeader(
            kind=pb.TaskHeader.TRAIN, round=rnd.idx, task_id=rnd.task_ids[cid],
            plan=pb.Plan(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, momentum=plan.momentum,
                         weight_decay=plan.weight_decay, prox_mu=plan.prox_mu, max_steps=plan.max_steps,
                         seed=plan.seed),
            tensor=pb.TensorHeader(dtype="float32", shape=[self.numel], num_bytes=self.numel * 4))
        yield pb.TaskChunk(header=header)
        for chunk in rnd.payload:  # the same serialized messages for every client: nothing copied per client
            yield chunk
        rnd.bytes_down += self.numel * 4

    async def _open_stream(self, request_iterator, context, rpc: str, header_name: str):
        """(stream, header, client id) of a client stream: the first message must be the header, and it must be
        signed by a client with a live session; anything else is refused."""
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        if first is None or isinstance(first, (Malformed, DataChunk)) or first.WhichOneof("part") != "header":
            error = first.error if isinstance(first, Malformed) else f"first message must be {header_name}"
            await self._refuse(context, WireError("malformed", f"{rpc}: {error}"), "a peer")
        cid = await self._authenticate(context, rpc, first.header)
        await self._session(context, cid, first.header.session)
        return stream, first.header, cid

    async def push_update(self, request_iterator, context):
        stream, h, cid = await self._open_stream(request_iterator, context, "PushUpdate", "an UpdateHeader")
        what = f"update from client {cid} for round {h.round}"
        try:
            rnd = self._open_task(cid, h, what)
            if rnd.secagg is not None:
                raise WireError("malformed", f"{what}: the round runs secure aggregation; send SecAggPush")
            compressed = self._check_codec(h, what)
            if not compressed:
                check_header(h.tensor, self.numel, what)
            if h.num_examples < 1:
                raise WireError("malformed", f"{what}: num_examples must be >= 1, got {h.num_examples}")
            if not math.isfinite(h.train_loss):
                raise WireError("nonfinite", f"{what}: train_loss is {h.train_loss}")
            total = check_parts(h.parts, self.numel * 8 + 64, what) if compressed else 0
            assembler = TensorAssembler(pb.TensorHeader(dtype="uint8", shape=[total], num_bytes=total)
                                        if compressed else h.tensor, what)
            async for chunk in stream:
                assembler.add(chunk_data(chunk, what))
            delta = self._decompress(cid, h, assembler, what) if compressed else assembler.tensor()
            rnd = self._open_task(cid, h, what)  # the round may have closed while the bytes arrived
        except WireError as err:
            await self._refuse(context, err, f"client {cid}")
        if len(rnd.reported) >= rnd.target:
            rnd.late += 1  # over-selected surplus: the round already has its target
            return pb.PushReply(accepted=False, message=f"round {rnd.idx} already has its {rnd.target} updates")
        rnd.add(cid, Update(delta, h.num_examples, {"train_loss": h.train_loss}), len(assembler.buffer))
        return pb.PushReply(accepted=True, message=f"round {rnd.idx}: update {len(rnd.reported)}/{rnd.target}")

    def _check_codec(self, h, what: str) -> bool:
        """True for a compressed update (codec and parts instead of one float32 tensor), of the server's codec."""
        codec = self.config.fl.compression.codec
        if not h.codec and not h.parts:
            if codec != "none":
                raise WireError("malformed", f"{what}: an uncompressed update; fl.compression.codec is {codec!r}")
            return False
        if h.codec != codec or h.HasField("tensor"):
            raise WireError("malformed", f"{what}: compressed with {h.codec!r}; fl.compression.codec is {codec!r}")
        return True

    def _decompress(self, cid: int, h, assembler: TensorAssembler, what: str) -> torch.Tensor:
        if assembler.received != len(assembler.buffer):
            raise WireError("malformed", f"{what}: stream ended after {assembler.received} of "
                                         f"{len(assembler.buffer)} bytes")
        tensors = split_parts(assembler.buffer, h.parts, what)
        enc = Encoded(h.codec, (self.numel,), torch.float32, tensors, len(assembler.buffer))
        try:
            delta = self.stages.decode(cid, enc)
        except (ValueError, KeyError, IndexError, RuntimeError, TypeError) as err:
            raise WireError("malformed", f"{what}: {err} (stage decompress)") from err
        if delta.shape != (self.numel,) or delta.dtype != torch.float32:
            raise WireError("shape", f"{what}: decompresses to {delta.dtype} {tuple(delta.shape)}")
        if not bool(torch.isfinite(delta).all()):
            raise WireError("nonfinite", f"{what}: decompresses to NaN/Inf values")
        return delta

    async def push_secagg(self, request_iterator, context):
        """One secure-aggregation message from a client (its keys, shares, masked input or unmask shares)."""
        stream, h, cid = await self._open_stream(request_iterator, context, "SecAggPush", "a SecAggHeader")
        what = f"secure-aggregation message from client {cid} for round {h.round}"
        try:
            rnd = self._open_secagg(cid, h, what)
            limit = 8 * (self.numel + 2) + 256 * (len(rnd.selected) + 1) + 64
            if not 0 < h.num_bytes <= limit:
                raise WireError("oversized" if h.num_bytes > limit else "malformed",
                                f"{what}: declares {h.num_bytes} bytes (at most {limit})")
            if not math.isfinite(h.train_loss) or h.num_examples < 0:
                raise WireError("malformed", f"{what}: train_loss {h.train_loss}, num_examples {h.num_examples}")
            payload = bytearray()
            async for chunk in stream:
                payload += chunk_data(chunk, what)
                if len(payload) > h.num_bytes:
                    raise WireError("oversized", f"{what}: more than the {h.num_bytes} bytes its header declared")
            if len(payload) != h.num_bytes:
                raise WireError("malformed", f"{what}: ended after {len(payload)} of {h.num_bytes} bytes")
            rnd = self._open_secagg(cid, h, what)
            try:
                msg = rnd.secagg.receive(cid, bytes(payload))
            except ValueError as err:
                raise WireError("malformed", f"{what}: {err}") from err
            except SecAggError as err:  # out of step with the protocol (late, repeated, for the wrong clients)
                raise WireError("stale", f"{what}: {err}") from err
        except WireError as err:
            await self._refuse(context, err, f"client {cid}")
        if isinstance(msg, MaskedInput):
            rnd.loss_sum += h.train_loss * h.num_examples
            rnd.examples += h.num_examples
            rnd.reported.append(cid)
        rnd.changed.set()
        return pb.PushReply(accepted=True, message=f"round {rnd.idx}: {type(msg).__name__} accepted "
                                                   f"(stage {rnd.secagg.stage})")

    def _open_secagg(self, cid: int, h, what: str) -> RoundState:
        rnd = self.round
        if rnd is None or h.round != rnd.idx or rnd.secagg is None:
            current = rnd.idx if rnd is not None else self.state.round
            raise WireError("stale", f"{what}: the server is at round {current} without secure aggregation open")
        if rnd.task_ids.get(cid) != h.task_id:
            raise WireError("stale", f"{what}: task {h.task_id!r} is not this client's task for the round")
        if rnd.closed or cid in rnd.gone:
            raise WireError("stale", f"{what}: the client {'was dropped' if cid in rnd.gone else 'round is closed'}")
        return rnd

    def _open_task(self, cid: int, h, what: str) -> RoundState:
        rnd = self.round
        if rnd is None or h.round != rnd.idx:
            current = rnd.idx if rnd is not None else self.state.round
            raise WireError("stale", f"{what}: the server is at round {current}")
        if rnd.task_ids.get(cid) != h.task_id:
            raise WireError("stale", f"{what}: task {h.task_id!r} is not this client's task for the round")
        if not rnd.waiting_on(cid):
            state = "already reported" if cid in rnd.reported else "was dropped" if cid in rnd.gone else "is closed"
            raise WireError("stale", f"{what}: the round {state}")
        return rnd

    # ---- the round loop -----------------------------------------------------------------------------------
    def _alive(self) -> dict[int, ClientInfo]:
        horizon = time.monotonic() - self.config.net.heartbeat_timeout_s
        return {cid: info for cid, info in self.clients.items() if info.last_seen >= horizon}

    async def _wait_for_clients(self) -> None:
        """Until `net.wait_for_clients` are connected, or for `net.wait_timeout_s` once the quorum
        (`fl.min_clients`) is: a server with fewer clients than its quorum waits for them, burning no round."""
        wanted, quorum = self.config.net.wait_for_clients or self.config.fl.min_clients, self.config.fl.min_clients
        patience_until = None
        self.phase = f"waiting for {wanted} clients"
        while True:
            connected = len(self._alive())
            if connected >= wanted:
                return
            if connected >= quorum:
                patience_until = patience_until or time.monotonic() + self.config.net.wait_timeout_s
                if time.monotonic() >= patience_until:
                    return
            await asyncio.sleep(0.05)

    def _open_round(self, round_idx: int) -> tuple[RoundState | None, dict[str, Any]]:
        fl = self.config.fl
        alive = self._alive()
        rng = np.random.default_rng([self.config.run.seed, 3, round_idx])  # the simulator's selection stream
        selection = select_clients({cid: info.properties for cid, info in alive.items()}, fl.fraction,
                                   fl.min_clients, fl.over_selection, self.eligible, rng)
        record = {"round": round_idx, "connected": len(alive), "eligible": selection.num_eligible,
                  "selected": len(selection.selected)}
        if not selection.selected:
            return None, record
        plans = {cid: fl.plan.for_client(client_seed(self.config.run.seed, round_idx, cid))
                 for cid in selection.selected}
        # The weights as serialized data chunks, made once (one copy, a snapshot) and streamed to every client.
        payload = list(tensor_data_chunks(self.state.params, self.config.net.chunk_bytes))
        secagg = aggregator = None
        if fl.strategy.name == "secagg":  # the protocol's server half; the client halves run in the clients
            try:
                secagg = SecAggRound(fl.strategy, self.numel, selection.selected, seed=self.config.run.seed,
                                     round_idx=round_idx)
            except SecAggError as err:  # e.g. fewer than 2 clients selected
                record["aggregation_error"] = str(err)
                return None, record
        else:  # the simulator's aggregator: the strategy, wrapped by central DP when it is on
            inner = make_aggregator(fl.strategy, self.numel, seed=self.config.run.seed, round_idx=round_idx)
            aggregator = self.privacy.wrap(inner, self.state.opt_state, round_idx)
            if hasattr(aggregator, "begin"):  # strategies that need the selected set up front
                aggregator.begin(list(selection.selected))
        rnd = RoundState(round_idx, selection.selected, selection.target, plans, payload, aggregator, secagg=secagg)
        return rnd, record

    async def _collect(self, rnd: RoundState) -> int:
        """Wait for the round's reports; returns how many selected clients were lost (silent past the timeout)."""
        deadline = time.monotonic() + self.config.net.round_timeout_s
        lost = 0
        while len(rnd.reported) < rnd.target:
            alive = self._alive()
            for cid in rnd.outstanding():
                if cid not in alive:  # heartbeat stopped: drop it now rather than at the deadline
                    rnd.gone.add(cid)
                    lost += 1
                    log.warning("round %d: client %d lost (no heartbeat for %.1f s), dropped", rnd.idx, cid,
                                self.config.net.heartbeat_timeout_s)
            if not rnd.outstanding():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("round %d: deadline passed, dropping stragglers %s", rnd.idx, rnd.outstanding())
                rnd.gone.update(rnd.outstanding())
                break
            try:
                await asyncio.wait_for(rnd.complete.wait(), min(remaining, 0.1))
            except asyncio.TimeoutError:
                pass
        rnd.closed = True
        return lost

    async def _wait_stage(self, rnd: RoundState, pending, enough, deadline: float) -> None:
        """Until every client `pending()` names answered or was dropped (heartbeat lost, deadline), or `enough()`."""
        self._wake_pollers()  # the stage's messages were just posted: clients holding a poll fetch them now
        while not enough():
            alive = self._alive()
            for cid in sorted(pending()):
                if cid not in alive:  # heartbeat stopped: drop it now rather than at the deadline
                    rnd.gone.add(cid)
                    rnd.secagg.drop(cid)
                    rnd.lost += 1
                    log.warning("round %d: client %d lost (no heartbeat for %.1f s) in stage %s, dropped", rnd.idx,
                                cid, self.config.net.heartbeat_timeout_s, rnd.secagg.stage)
            if not pending():
                return
            if time.monotonic() >= deadline:
                log.warning("round %d: deadline passed in stage %s, dropping %s", rnd.idx, rnd.secagg.stage,
                            sorted(pending()))
                for cid in pending():
                    rnd.gone.add(cid)
                    rnd.secagg.drop(cid)
                return
            rnd.changed.clear()
            try:
                await asyncio.wait_for(rnd.changed.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def _collect_secagg(self, rnd: RoundState, record: dict[str, Any]) -> torch.Tensor | None:
        """Run the protocol's stages with the selected clients; the weighted mean, or None (record says why)."""
        deadline = time.monotonic() + self.config.net.round_timeout_s
        wait = lambda pending, enough: self._wait_stage(rnd, pending, enough, deadline)  # noqa: E731
        try:
            outcome = await rnd.secagg.run(rnd.selected, rnd.target, wait, rnd.gone)
            mean = weighted_mean(outcome)
        except SecAggError as err:  # too many dropouts: this round releases nothing
            record["aggregation_error"] = str(err)
            log.warning("round %d: %s", rnd.idx, err)
            return None
        finally:
            rnd.closed = True
        record.update(secagg_dropped=len(outcome.dropped), participants=len(outcome.survivors))
        return mean

    async def _run_round(self) -> dict[str, Any]:
        fl, round_idx = self.config.fl, self.state.round + 1
        state = self.state
        if self.privacy.budget_spent(state.opt_state):  # one more release would overspend privacy.epsilon_budget
            record = {"round": round_idx, "participants": 0, "dropped": 0, "skipped": True, "stop": True}
            self.state = ServerState(round_idx, state.params, state.opt_state)
            self.privacy.record_epsilon(self.state.opt_state, record)
            return await self._finish_record(record, round_idx, final=True, started=time.perf_counter())
        await self._wait_for_clients()
        started = time.perf_counter()
        self.round_rejected = Counter()
        rnd, record = self._open_round(round_idx)
        self.round = rnd
        mean = None
        if rnd is not None:
            self.phase = f"round {round_idx}: training"
            self._wake_pollers()
            if rnd.secagg is not None:
                mean = await self._collect_secagg(rnd, record)
                record["lost"] = rnd.lost
                record.setdefault("participants", len(rnd.reported))
                record.update(dropped=len(rnd.selected) - record["participants"], late=rnd.late,
                              bytes_down=rnd.bytes_down + rnd.secagg.bytes_down, bytes_up=rnd.secagg.bytes_up)
            else:
                record["lost"] = await self._collect(rnd)
                record.update(participants=len(rnd.reported), dropped=len(rnd.selected) - len(rnd.reported),
                              late=rnd.late, bytes_down=rnd.bytes_down, bytes_up=rnd.bytes_up)
        else:
            record.update(participants=0, dropped=0)
        if rnd is None or record["participants"] < fl.min_clients or (rnd.secagg is not None and mean is None):
            record["skipped"] = True  # quorum not reached: the global model stays as it is
            params, opt_state = state.params, state.opt_state
        else:
            aggregator = rnd.aggregator
            if mean is None:
                mean = aggregator.result()
            params, opt_state = self.server_opt.apply(state.params, mean, state.opt_state)
            self.privacy.after_release(aggregator, opt_state, record)
            record["train_loss"] = rnd.loss_sum / max(rnd.examples, 1)
        self.state = ServerState(round_idx, params, opt_state)
        self.privacy.record_epsilon(self.state.opt_state, record)
        return await self._finish_record(record, round_idx, final=False, started=started)

    async def _finish_record(self, record: dict[str, Any], round_idx: int, *, final: bool,
                             started: float) -> dict[str, Any]:
        fl, params = self.config.fl, self.state.params
        if final or round_idx == fl.rounds or (fl.eval_every and round_idx % fl.eval_every == 0):
            self.phase = f"round {round_idx}: evaluating"
            metrics = await asyncio.to_thread(evaluate, self.model, self.spec, params, self.test_x, self.test_y)
            record.update(accuracy=metrics["accuracy"], loss=metrics["loss"])
        record.update({f"rejected_{reason}": n for reason, n in self.round_rejected.items()})
        record["wall_s"] = time.perf_counter() - started
        return record

    def _snapshot(self) -> dict[str, Any]:
        rnd = self.round
        current = {} if rnd is None else {
            "round": rnd.idx, "selected": rnd.selected, "target": rnd.target, "finished": sorted(rnd.reported),
            "dropped": sorted(rnd.gone), "closed": rnd.closed,
            "secagg_stage": rnd.secagg.stage if rnd.secagg is not None else None}
        return {"run": self.config.run.name, "phase": self.phase, "round": self.state.round,
                "rounds": self.config.fl.rounds, "connected": len(self._alive()), "registered": len(self.clients),
                "current": current, "history": list(self.history),
                "rejected": {reason: self.rejected.get(reason, 0) for reason in REASONS},
                "rss_mib": _rss_mib(), "port": self.port, "time": time.time()}

    async def _publish_forever(self) -> None:
        while True:
            self.board.publish(self._snapshot())
            await asyncio.sleep(0.25)

    async def serve(self) -> RunDir:
        net = self.config.net
        self._wakeup = asyncio.Event()
        # grpc.aio takes incoming calls from gRPC core one at a time on this event loop; calls that arrive while it
        # is busy wait in core's queue of unrequested calls, and past grpc.server.max_pending_requests (default
        # 1000; randomly more of them up to the hard limit, default 3000) core refuses them with CANCELLED before
        # any handler runs. Every connected client can have a register, a heartbeat and a poll arriving at once
        # (a server start, synchronized heartbeats), so the queue must hold several calls per client.
        pending = [("grpc.server.max_pending_requests", _MAX_PENDING_RPCS),
                   ("grpc.server.max_pending_requests_hard_limit", 2 * _MAX_PENDING_RPCS)]
        server = grpc.aio.server(options=grpc_options(net.chunk_bytes) + pending + [("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self._handlers(),))
        address = f"[{net.host}]:{net.port}" if ":" in net.host else f"{net.host}:{net.port}"
        if net.use_tls:
            self.port = server.add_secure_port(address, server_credentials(net.cert_dir, net.client_certs))
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"net.port: could not bind {address}")
        await server.start()
        httpd = None
        if net.status_port >= 0:
            httpd = await asyncio.to_thread(serve_status, self.board, net.status_host, net.status_port)
            self.status_port = httpd.server_address[1]
        (self.run.path / "server.json").write_text(json.dumps(
            {"host": net.host, "port": self.port, "status_port": self.status_port, "pid": os.getpid(),
             "tls": net.use_tls}), encoding="utf-8")
        log.info("serving on %s:%d (%s, auth %s); status on http://%s:%d/", net.host, self.port,
                 "TLS" if net.use_tls else "no TLS", net.auth, net.status_host, self.status_port)
        publisher = asyncio.create_task(self._publish_forever())
        began = time.perf_counter()
        try:
            with MetricsLog(self.run.metrics_path) as metrics:
                while self.state.round < self.config.fl.rounds:
                    record = await self._run_round()
                    record["elapsed_s"] = time.perf_counter() - began
                    metrics.write(record)
                    state = self.state
                    await asyncio.to_thread(save_checkpoint, self.run.checkpoint_path, {
                        "round": state.round, "params": state.params, "opt_state": state.opt_state})
                    self.history.append({k: record.get(k) for k in ("round", "accuracy", "loss", "participants",
                                                                     "dropped")})
                    if record.get("stop"):  # the privacy budget is spent: no round may release anything more
                        log.info("round %d: privacy budget spent (epsilon %.3f), stopping", state.round,
                                 record.get("epsilon", math.nan))
                        break
                    log.info("round %d: %d/%d reported, %d dropped%s", state.round, record["participants"],
                             record["selected"], record["dropped"],
                             f", accuracy {record['accuracy']:.4f}" if "accuracy" in record else "")
            self.done, self.phase = True, "done"
            self._wake_pollers()
            linger_until = time.monotonic() + net.linger_s
            while time.monotonic() < linger_until and any(not c.told_done for c in self._alive().values()):
                await asyncio.sleep(0.05)
            self.board.publish(self._snapshot())
        finally:
            publisher.cancel()
            await server.stop(grace=1.0)
            if httpd is not None:
                httpd.shutdown()
        return self.run


def run_server(config: NetworkRunConfig, resume: bool = False) -> RunDir:
    return asyncio.run(NetServer(config, resume).serve())
