"""The client's side of the wire: signed calls over one gRPC channel, tasks and updates as chunked tensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import grpc
import torch

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import sign
from plait.federated.net.wire import (
    SERVICE,
    DataChunk,
    Malformed,
    TensorAssembler,
    WireError,
    check_header,
    chunk_data,
    chunk_parser,
    data_chunks,
    grpc_options,
    part_headers,
    plan_from_message,
    serialize,
    tensor_data_chunks,
    tensor_header,
)
from plait.federated.plan import TrainingPlan

# The channel's own reconnect backoff stays short; the client's loop adds its own, jittered, on top.
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
              ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass(slots=True)
class Task:
    round: int
    task_id: str
    plan: TrainingPlan | None     # None: an evaluation task (evaluate `params` on the held-out data)
    params: torch.Tensor
    program_sha256: str = ""      # the shipped program the plan trains (net.ship_program); "": the imported model


@dataclass(slots=True)
class SecAggTask:
    round: int
    task_id: str
    payload: bytes   # an encoded server message (secagg.messages); empty: advertise this round's keys


# A server message carries a few keys or shares per neighbour: far below this, which bounds what a client reads.
MAX_SECAGG_DOWN = 64 << 20


class Connection:
    def __init__(self, address: str, client_id: int, key: bytes | None,
                 credentials: grpc.ChannelCredentials | None = None, chunk_bytes: int = 1 << 20):
        self.client_id, self.key, self.chunk_bytes = client_id, key, chunk_bytes
        options = grpc_options(chunk_bytes) + _RECONNECT
        self.channel = (grpc.secure_channel(address, credentials, options) if credentials is not None
                        else grpc.insecure_channel(address, options))
        def method(name: str) -> str:
            return f"/{SERVICE}/{name}"
        self._register = self.channel.unary_unary(method("Register"), serialize, pb.RegisterReply.FromString)
        self._heartbeat = self.channel.unary_unary(method("Heartbeat"), serialize, pb.HeartbeatReply.FromString)
        self._get_task = self.channel.unary_stream(method("GetTask"), serialize, chunk_parser(pb.TaskChunk))
        self._push = self.channel.stream_unary(method("PushUpdate"), serialize, pb.PushReply.FromString)
        self._push_secagg = self.channel.stream_unary(method("SecAggPush"), serialize, pb.PushReply.FromString)
        self._get_program = self.channel.unary_stream(method("GetProgram"), serialize, chunk_parser(pb.ProgramChunk))

    def metadata(self, method: str) -> list[tuple[str, str]]:
        return sign(self.key, method, self.client_id) if self.key is not None else []

    def register(self, properties: dict[str, bool], num_examples: int, model: str = "", num_params: int = 0,
                 pipeline: str = "", timeout: float = 10) -> pb.RegisterReply:
        """`model`, `num_params`, `pipeline`: what this client trains, which the server checks against its own
        (empty: not said)."""
        request = pb.RegisterRequest(client_id=self.client_id, properties=pb.Properties(**properties),
                                     num_examples=num_examples, model=model, num_params=num_params,
                                     pipeline=pipeline)
        return self._register(request, metadata=self.metadata("Register"), timeout=timeout)

    def heartbeat(self, session: str, properties: dict[str, bool], timeout: float = 5) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(client_id=self.client_id, session=session,
                                      properties=pb.Properties(**properties))
        return self._heartbeat(request, metadata=self.metadata("Heartbeat"), timeout=timeout)

    def get_task(self, session: str, wait_s: float, num_params: int,
                 out: torch.Tensor | None = None) -> pb.TaskHeader | Task | SecAggTask:
        """A TRAIN or EVALUATE task with its weights, a SECAGG message, or the bare header of a WAIT / DONE answer.

        `out`: a float32[num_params] tensor the weights are received into (the task's params are then a view of
        it), so that a client reuses one buffer across rounds instead of mapping fresh pages for every model.
        """
        request = pb.TaskRequest(client_id=self.client_id, session=session, wait_s=wait_s)
        stream = self._get_task(request, metadata=self.metadata("GetTask"), timeout=wait_s + 60)
        first = next(stream)
        if isinstance(first, (DataChunk, Malformed)) or first.WhichOneof("part") != "header":
            raise ValueError("GetTask: the server's stream did not start with a header")
        header = first.header
        if header.kind == pb.TaskHeader.SECAGG:
            if not 0 <= header.secagg_bytes <= MAX_SECAGG_DOWN:
                raise ValueError(f"GetTask: a secure-aggregation message of {header.secagg_bytes} bytes")
            payload = bytearray()
            for chunk in stream:
                payload += _data(chunk)
                if len(payload) > header.secagg_bytes:
                    raise ValueError("GetTask: the secure-aggregation message is longer than its header says")
            if len(payload) != header.secagg_bytes:
                raise ValueError(f"GetTask: secure-aggregation message ended after {len(payload)} of "
                                 f"{header.secagg_bytes} bytes")
            return SecAggTask(header.round, header.task_id, bytes(payload))
        if header.kind not in (pb.TaskHeader.TRAIN, pb.TaskHeader.EVALUATE):
            stream.cancel()
            return header
        what = f"round {header.round} weights from the server"
        check_header(header.tensor, num_params, what)
        assembler = TensorAssembler(header.tensor, what, out)
        for chunk in stream:
            assembler.add(_data(chunk))
        try:
            plan = plan_from_message(header.plan) if header.kind == pb.TaskHeader.TRAIN else None
        except ValueError as err:
            raise ValueError(f"GetTask: the server's plan for round {header.round}: {err}") from err
        return Task(header.round, header.task_id, plan, assembler.tensor(),
                    header.plan.program_sha256 if plan is not None else "")

    def get_program(self, session: str, sha256: str, max_bytes: int, timeout: float = 300) -> bytes:
        """The shipped program's bytes (not yet checked against `sha256`: the reader does that before parsing).
        A program the server declares larger than `max_bytes` is refused before any of it is received."""
        request = pb.ProgramRequest(client_id=self.client_id, session=session, sha256=sha256)
        stream = self._get_program(request, metadata=self.metadata("GetProgram"), timeout=timeout)
        first = next(stream)
        if isinstance(first, (DataChunk, Malformed)) or first.WhichOneof("part") != "header":
            raise ValueError("GetProgram: the server's stream did not start with a header")
        size = first.header.num_bytes
        if not 0 < size <= max_bytes:
            stream.cancel()
            raise ValueError(f"the server's program is {size} bytes, outside (0, net.max_program_bytes = "
                             f"{max_bytes}]: refused")
        data = bytearray()
        for chunk in stream:
            data += _data(chunk)
            if len(data) > size:
                stream.cancel()
                raise ValueError(f"the server's program is longer than the {size} bytes its header declared")
        if len(data) != size:
            raise ValueError(f"the server's program ended after {len(data)} of {size} bytes")
        return bytes(data)

    def push_update(self, session: str, task: Task, delta: torch.Tensor, num_examples: int,
                    train_loss: float, timeout: float = 120) -> pb.PushReply:
        header = pb.UpdateHeader(client_id=self.client_id, session=session, round=task.round, task_id=task.task_id,
                                 num_examples=num_examples, train_loss=train_loss, tensor=tensor_header(delta))
        # Data chunks are serialized straight from the tensor's memory, lazily: the stream's sending thread copies
        # each chunk once while the next is being written.
        return self.push_chunks(chain([pb.UpdateChunk(header=header)], tensor_data_chunks(delta, self.chunk_bytes)),
                                timeout)

    def push_evaluation(self, session: str, task: Task, num_examples: int, accuracy: float | None, loss: float,
                        timeout: float = 60) -> pb.PushReply:
        """An evaluation task's answer: figures on the held-out data (no accuracy for regression), no tensor."""
        header = pb.UpdateHeader(client_id=self.client_id, session=session, round=task.round, task_id=task.task_id,
                                 num_examples=num_examples, evaluation=True, eval_loss=loss)
        if accuracy is not None:
            header.eval_accuracy = accuracy
        return self.push_chunks([pb.UpdateChunk(header=header)], timeout)

    def push_compressed(self, session: str, task: Task, codec: str, tensors: dict[str, torch.Tensor],
                        num_examples: int, train_loss: float, timeout: float = 120) -> pb.PushReply:
        """A compressed update: the codec's named tensors, their bytes one after the other."""
        header = pb.UpdateHeader(client_id=self.client_id, session=session, round=task.round, task_id=task.task_id,
                                 num_examples=num_examples, train_loss=train_loss, codec=codec,
                                 parts=part_headers(tensors))
        data = (c for t in tensors.values() if t.numel() for c in tensor_data_chunks(t, self.chunk_bytes))
        return self.push_chunks(chain([pb.UpdateChunk(header=header)], data), timeout)

    def push_secagg(self, session: str, round_idx: int, task_id: str, payload: bytes, *, num_examples: int = 0,
                    train_loss: float = 0.0, timeout: float = 120) -> pb.PushReply:
        """One encoded secure-aggregation message (secagg.messages.encode), in chunks."""
        header = pb.SecAggHeader(client_id=self.client_id, session=session, round=round_idx, task_id=task_id,
                                 num_bytes=len(payload), num_examples=num_examples, train_loss=train_loss)
        chunks = chain([pb.SecAggChunk(header=header)], data_chunks(payload, self.chunk_bytes))
        return self._push_secagg(chunks, metadata=self.metadata("SecAggPush"), timeout=timeout)

    def push_chunks(self, chunks: Iterable[pb.UpdateChunk | bytes], timeout: float = 120) -> pb.PushReply:
        """Stream any sequence of chunks, messages or already serialized (the update path, and tests that send
        broken ones)."""
        return self._push(iter(chunks), metadata=self.metadata("PushUpdate"), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def _data(chunk) -> memoryview | bytes:
    try:
        return chunk_data(chunk, "GetTask")
    except WireError as err:
        raise ValueError(str(err)) from err


def raw_call(channel: grpc.Channel, name: str, payload: bytes, metadata, timeout: float = 10) -> bytes:
    """Send undecoded bytes to a unary method (for checking that the server refuses malformed messages)."""
    call = channel.unary_unary(f"/{SERVICE}/{name}", lambda b: b, lambda b: b)
    return call(payload, metadata=metadata, timeout=timeout)

