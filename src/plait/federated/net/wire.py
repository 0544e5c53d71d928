"""Tensors on the wire: a header (dtype, shape, byte count) then the raw little-endian bytes in chunks.

Security rule: nothing on the wire is ever unpickled. A received tensor is checked against what the receiver
expects (dtype, shape, size, finite values) before it is used, and every refusal names its reason, so the server
can answer that client clearly and count it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from plait.core.finite import all_finite
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.plan import TrainingPlan

assert sys.byteorder == "little", "the wire format is little-endian raw bytes"

M = TypeVar("M", bound=Message)

SERVICE = "plait.fl.v1.FederatedLearning"

# Reasons a request is refused; each is a metrics counter (rejected_<reason>).
REASONS = ("malformed", "shape", "dtype", "nonfinite", "norm", "oversized", "stale", "busy", "unauthenticated",
           "replay", "mismatch")


def grpc_options(chunk_bytes: int) -> list[tuple[str, object]]:
    limit = max(chunk_bytes, 4 << 20) + (64 << 10)  # one chunk plus its envelope; whole models never sit in one
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class WireError(ValueError):
    """A peer sent something unusable. `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Malformed:
    """What a safe deserializer returns for bytes that are not the expected protobuf message."""
    type_name: str
    error: str


def safe_parser(message_type: type[M]) -> Callable[[bytes], M | Malformed]:
    """A gRPC deserializer that never raises: the handler sees `Malformed` and can answer and count it (a raising
    deserializer makes gRPC fail the call before any handler runs)."""
    def parse(data: bytes) -> M | Malformed:
        msg = message_type()
        try:
            msg.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as err:
            return Malformed(message_type.__name__, str(err) or "undecodable bytes")
        return msg

    return parse


def plan_message(plan: TrainingPlan, program_sha256: str = "") -> pb.Plan:
    """The plan as its protobuf message: the fields share their names, so neither side lists them; with the hash of
    the shipped program the round trains (net.ship_program), if any."""
    return pb.Plan(**{f.name: getattr(plan, f.name) for f in fields(TrainingPlan)}, program_sha256=program_sha256)


def plan_from_message(message: pb.Plan) -> TrainingPlan:
    """A received plan; TrainingPlan checks every value (a ValueError names the bad one)."""
    return TrainingPlan(**{f.name: getattr(message, f.name) for f in fields(TrainingPlan)})


def tensor_header(tensor: torch.Tensor) -> pb.TensorHeader:
    return pb.TensorHeader(dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                           num_bytes=tensor.numel() * tensor.element_size())


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes as a flat memoryview, without copying (a copy only if it is not contiguous on CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def iter_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[bytes]:
    """The tensor's raw bytes, `chunk_bytes` at a time (one copy per chunk)."""
    view = byte_view(tensor)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


# Fast path for the bulk of every stream. TaskChunk, UpdateChunk, SecAggChunk and ProgramChunk all carry their bytes
# in field 2 (`bytes data = 2` of the oneof), so a data chunk serializes to the tag 0x12, the length as a varint, the
# raw bytes. Building that directly copies each byte once, where a protobuf message would copy it in and copy it out
# again; parsing it directly hands out a view of the received bytes instead of two more copies. The bytes on the wire
# are exactly what protobuf produces and accepts: peers using the generated classes interoperate unchanged.
_DATA_TAG = 0x12
for _msg in (pb.TaskChunk, pb.UpdateChunk, pb.SecAggChunk, pb.ProgramChunk):
    _field = _msg.DESCRIPTOR.fields_by_name["data"]
    assert (_field.number, _field.type) == (2, _field.TYPE_BYTES), f"{_msg.__name__}.data must stay bytes field 2"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def data_chunks(buffer, chunk_bytes: int) -> Iterator[bytes]:
    """Serialized `data` chunk messages (TaskChunk, UpdateChunk, SecAggChunk, ProgramChunk) over any bytes-like
    `buffer`."""
    view = memoryview(buffer).cast("B")
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        yield b"".join((bytes((_DATA_TAG,)), _varint(len(piece)), piece))


def tensor_data_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[bytes]:
    return data_chunks(byte_view(tensor), chunk_bytes)


def serialize(message: Message | bytes) -> bytes:
    """gRPC serializer: protobuf messages, or messages already serialized (`data_chunks`) passed through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A received chunk that is only data: a view of the message's bytes, nothing copied."""
    data: memoryview


def chunk_parser(message_type: type[M]) -> Callable[[bytes], M | DataChunk | Malformed]:
    """`safe_parser` for the chunk messages, with data-only messages returned as `DataChunk` views."""
    slow = safe_parser(message_type)

    def parse(data: bytes) -> M | DataChunk | Malformed:
        if len(data) > 1 and data[0] == _DATA_TAG:
            length, shift, pos = 0, 0, 1
            while pos < len(data) and pos <= 10:
                byte = data[pos]
                length |= (byte & 0x7F) << shift
                shift, pos = shift + 7, pos + 1
                if byte < 0x80:
                    if pos + length == len(data):  # exactly one data field: what protobuf would parse too
                        return DataChunk(memoryview(data)[pos:])
                    break
        return slow(data)

    return parse


def chunk_data(chunk: object, what: str) -> memoryview | bytes:
    """The bytes of a chunk that must be data (not a header, not malformed)."""
    if isinstance(chunk, DataChunk):
        return chunk.data
    if isinstance(chunk, Malformed) or chunk.WhichOneof("part") != "data":
        raise WireError("malformed", f"{what}: expected a data chunk after the header")
    return chunk.data


def check_header(header: pb.TensorHeader, numel: int, what: str) -> None:
    """A float32 vector of `numel` elements, declared in `num_bytes`: anything else is refused before reading."""
    if header.dtype != "float32":
        raise WireError("dtype", f"{what}: dtype {header.dtype!r}, expected 'float32'")
    if list(header.shape) != [numel]:
        raise WireError("shape", f"{what}: shape {list(header.shape)}, expected [{numel}]")
    if header.num_bytes != numel * 4:
        raise WireError("oversized" if header.num_bytes > numel * 4 else "malformed",
                        f"{what}: declares {header.num_bytes} bytes, a float32[{numel}] has {numel * 4}")


class TensorAssembler:
    """Collects chunks into one preallocated buffer; refuses a stream longer than its header declared.

    The buffer is uninitialized memory (zeroing it first would touch every page twice), or `out`: a caller's
    contiguous tensor of exactly the declared size, reused across transfers so that its pages are already mapped.
    """

    def __init__(self, header: pb.TensorHeader, what: str, out: torch.Tensor | None = None):
        self.what = what
        if out is None:
            self.storage = torch.empty(header.num_bytes, dtype=torch.uint8)
        else:
            if not out.is_contiguous() or out.device.type != "cpu" or \
                    out.numel() * out.element_size() != header.num_bytes:
                raise ValueError(f"{what}: out must be a contiguous CPU tensor of {header.num_bytes} bytes")
            self.storage = out.detach().reshape(-1).view(torch.uint8)
        self.buffer = memoryview(self.storage.numpy())
        self.received = 0
        self.shape = tuple(header.shape)

    def add(self, data: bytes | memoryview) -> None:
        end = self.received + len(data)
        if end > len(self.buffer):
            raise WireError("oversized", f"{self.what}: stream carries more than the {len(self.buffer)} bytes "
                                         "its header declared")
        self.buffer[self.received : end] = data
        self.received = end

    def tensor(self, check_finite: bool = True) -> torch.Tensor:
        if self.received != len(self.buffer):
            raise WireError("malformed", f"{self.what}: stream ended after {self.received} of "
                                         f"{len(self.buffer)} bytes")
        tensor = self.storage.view(torch.float32).view(self.shape)
        if check_finite and not all_finite(tensor):
            raise WireError("nonfinite", f"{self.what}: {int((~torch.isfinite(tensor)).sum())} NaN/Inf values")
        return tensor


# A compressed update travels as its codec's named tensors (core.compress.Encoded), each with its own header.
PART_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "int16": torch.int16,
               "int32": torch.int32, "int64": torch.int64}


def part_headers(tensors: dict[str, torch.Tensor]) -> list[pb.TensorHeader]:
    return [pb.TensorHeader(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                            num_bytes=t.numel() * t.element_size()) for name, t in tensors.items()]


def check_parts(parts, max_bytes: int, what: str) -> int:
    """Named 1-D parts of known dtypes whose sizes add up; returns their total bytes (at most `max_bytes`)."""
    names, total = set(), 0
    for part in parts:
        if not part.name or part.name in names:
            raise WireError("malformed", f"{what}: part names must be present and distinct, got {part.name!r}")
        names.add(part.name)
        dtype = PART_DTYPES.get(part.dtype)
        if dtype is None:
            raise WireError("dtype", f"{what}: part {part.name!r} has dtype {part.dtype!r}")
        if len(part.shape) != 1 or part.shape[0] < 0:
            raise WireError("shape", f"{what}: part {part.name!r} has shape {list(part.shape)}, expected 1-D")
        if part.num_bytes != part.shape[0] * dtype.itemsize:
            raise WireError("malformed", f"{what}: part {part.name!r} declares {part.num_bytes} bytes for "
                                         f"{part.dtype}[{part.shape[0]}]")
        total += part.num_bytes
    if not parts:
        raise WireError("malformed", f"{what}: a compressed update without parts")
    if total > max_bytes:
        raise WireError("oversized", f"{what}: {total} bytes of parts, more than an uncompressed update")
    return total


def split_parts(buffer, parts, what: str) -> dict[str, torch.Tensor]:
    """The received bytes (any bytes-like buffer) cut back into the named tensors; floating parts must be finite."""
    out, offset, view = {}, 0, memoryview(buffer).cast("B")
    for part in parts:
        raw = bytearray(view[offset : offset + part.num_bytes])  # one copy: each part gets aligned storage
        offset += part.num_bytes
        dtype = PART_DTYPES[part.dtype]
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if dtype.is_floating_point and not all_finite(tensor):
            raise WireError("nonfinite", f"{what}: part {part.name!r} holds NaN/Inf values")
        out[part.name] = tensor
    return out
