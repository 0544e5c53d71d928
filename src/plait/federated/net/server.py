"""The network server's gRPC service: transport and validation only.

Clients register, beat, long-poll for their task, and stream their update (or their evaluation figures) back. Every
request is authenticated and checked before it changes anything; a refused one is answered with the reason and
counted, and the server keeps serving everyone else; a refused update ends that client's task for the round. What
a round is (selection, plans, aggregation, privacy, evaluation) is the one round loop's (`round_loop.py`), driven
by `serve.py`; `backend.py` posts each round's tasks here and collects the answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from plait.federated.bounds import UpdateRefused
from plait.federated.client_program import ClientProgram
from plait.federated.client_update import Update
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net import update_checks as checks
from plait.federated.net.auth import Verifier, read_key
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.limits import RefusalLog, StreamSlots, bounded_data
from plait.federated.net.pipeline import pipeline_fingerprint
from plait.federated.net.round_state import ClientInfo, RoundState
from plait.federated.net.secagg_round import TRAIN
from plait.federated.net.status import HISTORY_KEYS, DashboardFeed, rss_mib
from plait.federated.net.wire import (
    REASONS,
    SERVICE,
    DataChunk,
    Malformed,
    TensorAssembler,
    WireError,
    check_header,
    check_parts,
    chunk_parser,
    data_chunks,
    plan_message,
    safe_parser,
    serialize,
)
from plait.federated.round_loop import Evaluation
from plait.federated.secagg.messages import MaskedInput
from plait.federated.secagg.protocol import SecAggError
from plait.federated.shipping.container import program_sha256
from plait.web import StatusBoard

log = logging.getLogger("plait.fl.server")

_CODES = {"stale": grpc.StatusCode.FAILED_PRECONDITION, "mismatch": grpc.StatusCode.FAILED_PRECONDITION,
          "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
          "replay": grpc.StatusCode.UNAUTHENTICATED, "busy": grpc.StatusCode.RESOURCE_EXHAUSTED}


class NetServer:
    def __init__(self, config: NetworkRunConfig, numel: int, rounds_done: int = 0, program: bytes = b""):
        self.config, net = config, config.net
        self.numel, self.rounds_done = numel, rounds_done
        # net.ship_program: the training program (shipping/), sent once per client; its hash goes with every plan
        self.shipped, self.shipped_sha256 = program, program_sha256(program) if program else ""
        self.shipped_bytes_sent = 0  # since the last round's record (which counts them in bytes_down)
        # the update pipeline's server half: decompression (clients run the encoding half)
        self.program = ClientProgram(config.fl, config.run.seed)
        self.fingerprint = pipeline_fingerprint(config.fl)
        master = None
        if net.auth == "hmac":
            master = read_key(net.secret_file or Path(net.cert_dir) / "server.secret", "net.secret_file")
        self.verifier = Verifier(master, net.replay_window_s)
        self.clients: dict[int, ClientInfo] = {}
        self.round: RoundState | None = None
        self.done = False
        self.rejected: Counter[str] = Counter()        # since this process started
        self.refusal_log = RefusalLog(log)
        self.streams = StreamSlots(net.max_streams_per_client, net.max_streams)
        self.round_rejected: Counter[str] = Counter()  # in the current round
        self.board = StatusBoard()
        self.feed = DashboardFeed(config)  # the dashboard's series, client rows and countdown (snapshot)
        self.phase = "starting"
        self.port = self.status_port = 0
        self._wakeup = asyncio.Event()  # replaced (and set) whenever a task is posted: long polls wake

    # ---- gRPC plumbing -------------------------------------------------------------------------------------
    def handlers(self) -> grpc.GenericRpcHandler:
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
            "GetProgram": grpc.unary_stream_rpc_method_handler(
                self.get_program, request_deserializer=safe_parser(pb.ProgramRequest), response_serializer=ser),
        })

    async def _refuse(self, context, err: WireError, who: str, cid: int | None = None) -> None:
        """Answer with a clear error, count it (for `cid` too, if it has a session); others are served on."""
        self.rejected[err.reason] += 1
        self.round_rejected[err.reason] += 1
        if cid is not None and cid in self.clients:
            info = self.clients[cid]
            info.refusals[err.reason] = info.refusals.get(err.reason, 0) + 1
            info.last_refusal = f"{err.reason}: {err}"
        self.refusal_log.write(who, err, self.rejected[err.reason])
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

    def wake_pollers(self) -> None:
        old, self._wakeup = self._wakeup, asyncio.Event()
        if old is not None:
            old.set()

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def register(self, request, context):
        cid = await self._authenticate(context, "Register", request)
        try:
            checks.check_registration(request, self.config, cid, self.numel, self.fingerprint)
        except WireError as err:
            await self._refuse(context, err, f"client {cid}")
        props = {k: getattr(request.properties, k) for k in ("charging", "idle", "unmetered")}
        previous = self.clients.get(cid)
        self.clients[cid] = info = ClientInfo(secrets.token_hex(8), props, request.num_examples, time.monotonic())
        if previous is not None:  # a new session, the same client: its counts go on
            info.rounds, info.evaluations = previous.rounds, previous.evaluations
            info.refusals, info.last_refusal = previous.refusals, previous.last_refusal
        log.info("client %d %s (%d examples)", cid, "re-registered" if previous else "registered",
                 request.num_examples)
        return pb.RegisterReply(session=self.clients[cid].session, heartbeat_s=self.config.net.heartbeat_s,
                                model=self.config.model.label, num_params=self.numel, pipeline=self.fingerprint,
                                program_sha256=self.shipped_sha256, program_bytes=len(self.shipped))

    async def heartbeat(self, request, context):
        cid = await self._authenticate(context, "Heartbeat", request)
        info = self.clients.get(cid)
        if info is None or info.session != request.session:
            return pb.HeartbeatReply(known=False, round=self.rounds_done)
        info.last_seen = time.monotonic()
        if request.HasField("properties"):
            info.properties = {k: getattr(request.properties, k) for k in ("charging", "idle", "unmetered")}
        return pb.HeartbeatReply(known=True, round=self.rounds_done)

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
                yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.DONE, round=self.rounds_done))
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
                yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.WAIT, round=self.rounds_done))
                return
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except TimeoutError:
                pass

    async def get_program(self, request, context):
        """The shipped program's bytes, after a header with their hash and length (once per client and run)."""
        cid = await self._authenticate(context, "GetProgram", request)
        await self._session(context, cid, request.session)
        if not self.shipped or request.sha256 != self.shipped_sha256:
            shipped = self.shipped_sha256[:16] or "no program (net.ship_program is off)"
            await self._refuse(context, WireError("stale", f"client {cid} asks for program {request.sha256[:16]!r}; "
                                                           f"the server ships {shipped}"), f"client {cid}", cid)
        yield pb.ProgramChunk(header=pb.ProgramHeader(sha256=self.shipped_sha256, num_bytes=len(self.shipped)))
        for chunk in data_chunks(self.shipped, self.config.net.chunk_bytes):
            yield chunk
        self.shipped_bytes_sent += len(self.shipped)
        log.info("client %d: sent the training program (%d bytes)", cid, len(self.shipped))

    async def _stream_task(self, rnd: RoundState, cid: int):
        tensor = pb.TensorHeader(dtype="float32", shape=[self.numel], num_bytes=self.numel * 4)
        if rnd.evaluation:
            header = pb.TaskHeader(kind=pb.TaskHeader.EVALUATE, round=rnd.idx, task_id=rnd.task_ids[cid],
                                   tensor=tensor)
        else:
            header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=rnd.idx, task_id=rnd.task_ids[cid],
                                   plan=plan_message(rnd.plans[cid], self.shipped_sha256), tensor=tensor)
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
        busy = self.streams.refusal(cid, rpc)
        if busy is not None:
            await self._refuse(context, busy, f"client {cid}", cid)
        return stream, first.header, cid  # the caller releases the stream's slot when it ends, however it ends

    async def push_update(self, request_iterator, context):
        stream, h, cid = await self._open_stream(request_iterator, context, "PushUpdate", "an UpdateHeader")
        try:
            if h.evaluation:
                return await self._push_evaluation(stream, h, cid, context)
            return await self._receive_update(stream, h, cid, context)
        finally:
            self.streams.release(cid)

    async def _receive_update(self, stream, h, cid: int, context):
        what = f"update from client {cid} for round {h.round}"
        task = None  # the client's open task, once its header named one: a refusal after that ends it
        try:
            rnd = task = self._open_task(cid, h, what)
            if rnd.evaluation:
                raise WireError("malformed", f"{what}: the task is an evaluation; send its figures")
            if rnd.secagg is not None:
                raise WireError("malformed", f"{what}: the round runs secure aggregation; send SecAggPush")
            compressed = checks.is_compressed(h, self.config.fl.compression.codec, what)
            if not compressed:
                check_header(h.tensor, self.numel, what)
            checks.check_claims(h, self.clients[cid].num_examples, what)
            total = check_parts(h.parts, self.numel * 8 + 64, what) if compressed else 0
            assembler = TensorAssembler(pb.TensorHeader(dtype="uint8", shape=[total], num_bytes=total)
                                        if compressed else h.tensor, what)
            async for data in bounded_data(stream, len(assembler.buffer), what):
                assembler.add(data)
            delta = (checks.decompress(self.program, cid, h, assembler, self.numel, what) if compressed
                     else assembler.tensor())
            rnd = self._open_task(cid, h, what)  # the round may have closed while the bytes arrived
        except WireError as err:
            if task is not None and task.waiting_on(cid):
                task.refuse(cid, err.reason)  # the task ends here: no re-download, no re-training this round
            await self._refuse(context, err, f"client {cid}", cid)
        if len(rnd.reported) >= rnd.target:
            rnd.late += 1  # over-selected surplus: the round already has its target
            return pb.PushReply(accepted=False, message=f"round {rnd.idx} already has its {rnd.target} updates")
        try:
            rnd.add(cid, Update(delta, h.num_examples, {"train_loss": h.train_loss}), len(assembler.buffer))
        except UpdateRefused as refusal:  # a bound of fl.bounds (norm, non-finite): the task ends, counted once
            rnd.refuse(cid, refusal.reason)
            await self._refuse(context, WireError(refusal.reason, f"{what}: {refusal}"), f"client {cid}", cid)
        self.clients[cid].rounds += 1
        return pb.PushReply(accepted=True, message=f"round {rnd.idx}: update {len(rnd.reported)}/{rnd.target}")

    async def _push_evaluation(self, stream, h, cid: int, context):
        what = f"evaluation from client {cid} for round {h.round}"
        try:
            rnd = self._open_task(cid, h, what)
            if not rnd.evaluation:
                raise WireError("malformed", f"{what}: the task is training; send an update")
            checks.check_evaluation(h, what)
            async for _ in stream:
                raise WireError("malformed", f"{what}: data after an evaluation's header")
        except WireError as err:
            await self._refuse(context, err, f"client {cid}", cid)
        accuracy = h.eval_accuracy if h.HasField("eval_accuracy") else None
        rnd.add_evaluation(Evaluation(cid, int(h.num_examples), accuracy, h.eval_loss))
        self.clients[cid].evaluations += 1
        return pb.PushReply(accepted=True, message=f"round {rnd.idx}: evaluation {len(rnd.reported)}/{rnd.target}")

    async def push_secagg(self, request_iterator, context):
        """One secure-aggregation message from a client (its keys, shares, masked input or unmask shares)."""
        stream, h, cid = await self._open_stream(request_iterator, context, "SecAggPush", "a SecAggHeader")
        try:
            return await self._receive_secagg(stream, h, cid, context)
        finally:
            self.streams.release(cid)

    async def _receive_secagg(self, stream, h, cid: int, context):
        what = f"secure-aggregation message from client {cid} for round {h.round}"
        try:
            rnd = self._open_secagg(cid, h, what)
            checks.check_secagg_header(h, self.numel, len(rnd.selected), what)
            payload = bytearray()
            async for data in bounded_data(stream, h.num_bytes, what):
                payload += data
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
            await self._refuse(context, err, f"client {cid}", cid)
        if isinstance(msg, MaskedInput):
            rnd.loss_sum += h.train_loss * h.num_examples
            rnd.examples += h.num_examples
            rnd.reported.append(cid)
            self.clients[cid].rounds += 1
        rnd.changed.set()
        return pb.PushReply(accepted=True, message=f"round {rnd.idx}: {type(msg).__name__} accepted "
                                                   f"(stage {rnd.secagg.stage})")

    def _open_secagg(self, cid: int, h, what: str) -> RoundState:
        rnd = self.round
        if rnd is None or h.round != rnd.idx or rnd.secagg is None:
            current = rnd.idx if rnd is not None else self.rounds_done
            raise WireError("stale", f"{what}: the server is at round {current} without secure aggregation open")
        if rnd.task_ids.get(cid) != h.task_id:
            raise WireError("stale", f"{what}: task {h.task_id!r} is not this client's task for the round")
        if rnd.closed or cid in rnd.gone:
            raise WireError("stale", f"{what}: the client {'was dropped' if cid in rnd.gone else 'round is closed'}")
        return rnd

    def _open_task(self, cid: int, h, what: str) -> RoundState:
        rnd = self.round
        if rnd is None or h.round != rnd.idx:
            current = rnd.idx if rnd is not None else self.rounds_done
            raise WireError("stale", f"{what}: the server is at round {current}")
        if rnd.task_ids.get(cid) != h.task_id:
            raise WireError("stale", f"{what}: task {h.task_id!r} is not this client's task for the round")
        if not rnd.waiting_on(cid):
            state = "already reported" if cid in rnd.reported else "was dropped" if cid in rnd.gone else "is closed"
            raise WireError("stale", f"{what}: the round {state}")
        return rnd

    # ---- what the backend calls (on this event loop) ---------------------------------------------------------
    def alive(self) -> dict[int, ClientInfo]:
        horizon = time.monotonic() - self.config.net.heartbeat_timeout_s
        return {cid: info for cid, info in self.clients.items() if info.last_seen >= horizon}

    def open_round(self, rnd: RoundState) -> None:
        """Post a round's tasks: clients holding a poll get theirs now."""
        self.round = rnd
        self.wake_pollers()

    def snapshot(self) -> dict[str, Any]:
        current = {} if self.round is None else self.round.summary()
        feed = self.feed.fields(self)
        history = [{k: r.get(k) for k in HISTORY_KEYS} for r in feed["series"]]  # status.json's older summary
        return {"run": self.config.run.name, "phase": self.phase, "round": self.rounds_done,
                "rounds": self.config.fl.rounds, "connected": len(self.alive()), "registered": len(self.clients),
                "current": current, "history": history,
                "rejected": {reason: self.rejected.get(reason, 0) for reason in REASONS},
                "rss_mib": rss_mib(), "port": self.port, "time": time.time(), **feed}

    async def publish_forever(self) -> None:
        while True:
            self.board.publish(self.snapshot())
            await asyncio.sleep(0.25)
