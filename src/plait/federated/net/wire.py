"""Tensors on the wire: a header (dtype, shape, byte count) then the raw little-endian bytes in chunks.

Security rule: nothing on the wire is ever unpickled. A received tensor is checked against what the receiver
expects (dtype, shape, size, finite values) before it is used, and every refusal names its reason, so the server
can answer that client clearly and count it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from plait.federated.net import plait_fl_pb2 as pb

assert sys.byteorder == "little", "the wire format is little-endian raw bytes"

M = TypeVar("M", bound=Message)

SERVICE = "plait.fl.v1.FederatedLearning"

# Reasons a request is refused; each is a metrics counter (rejected_<reason>).
REASONS = ("malformed", "shape", "dtype", "nonfinite", "oversized", "stale", "unauthenticated", "replay")


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


def tensor_header(tensor: torch.Tensor) -> pb.TensorHeader:
    return pb.TensorHeader(dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                           num_bytes=tensor.numel() * tensor.element_size())


def iter_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[bytes]:
    """The tensor's raw bytes, `chunk_bytes` at a time (one host copy into bytes)."""
    data = tensor.detach().contiguous().cpu().numpy().tobytes()
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


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
    """Collects chunks into one preallocated buffer; refuses a stream longer than its header declared."""

    def __init__(self, header: pb.TensorHeader, what: str):
        self.what = what
        self.buffer = bytearray(header.num_bytes)
        self.received = 0
        self.shape = tuple(header.shape)

    def add(self, data: bytes) -> None:
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
        tensor = torch.frombuffer(self.buffer, dtype=torch.float32).view(self.shape) if self.buffer else \
            torch.empty(self.shape)
        # NaN and Inf propagate through a sum: one fast reduction, and the exact count only when it fails (a
        # sum can also overflow on huge finite values, which the exact check then lets through).
        if check_finite and not bool(torch.isfinite(tensor.sum())):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise WireError("nonfinite", f"{self.what}: {bad} NaN/Inf values")
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


def split_parts(buffer: bytearray, parts, what: str) -> dict[str, torch.Tensor]:
    """The received bytes cut back into the named tensors; floating parts must be finite."""
    out, offset = {}, 0
    for part in parts:
        raw = bytes(buffer[offset : offset + part.num_bytes])  # a copy: each part gets aligned storage
        offset += part.num_bytes
        dtype = PART_DTYPES[part.dtype]
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise WireError("nonfinite", f"{what}: part {part.name!r} holds NaN/Inf values")
        out[part.name] = tensor
    return out
