"""The hand-written fast path for data chunks must be byte-identical to protobuf and refuse what protobuf refuses."""

import random

import pytest
import torch

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.wire import (
    DataChunk,
    Malformed,
    TensorAssembler,
    WireError,
    chunk_data,
    chunk_parser,
    data_chunks,
    serialize,
    tensor_data_chunks,
    tensor_header,
)

CHUNK_TYPES = (pb.TaskChunk, pb.UpdateChunk, pb.SecAggChunk)


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16383, 16384, 1 << 20, (1 << 20) + 5])
def test_data_chunks_are_protobufs_bytes_and_parse_back(length):
    rng = random.Random(length)
    raw = rng.randbytes(length)
    for chunk_bytes in (1, 100, 1 << 20):
        if length > 5000 and chunk_bytes < 1000:
            continue
        ours = list(data_chunks(raw, chunk_bytes))
        reference = [pb.UpdateChunk(data=raw[i : i + chunk_bytes]).SerializeToString()
                     for i in range(0, length, chunk_bytes)]
        assert ours == reference
        for message in CHUNK_TYPES:
            parse = chunk_parser(message)
            parsed = [parse(c) for c in ours]
            assert all(isinstance(c, DataChunk) for c in parsed)
            assert b"".join(bytes(c.data) for c in parsed) == raw


def test_other_fields_follow_protobuf_semantics():
    parse = chunk_parser(pb.UpdateChunk)
    header = pb.UpdateChunk(header=pb.UpdateHeader(client_id=3)).SerializeToString()
    assert parse(header).WhichOneof("part") == "header"
    mixed = pb.UpdateChunk(data=b"abc").SerializeToString() + header  # the last oneof member wins
    assert parse(mixed).WhichOneof("part") == "header"
    non_canonical = b"\x12\x83\x00abc"  # a length varint with a redundant byte
    assert bytes(parse(non_canonical).data) == pb.UpdateChunk.FromString(non_canonical).data == b"abc"
    assert parse(b"").WhichOneof("part") is None
    assert serialize(b"xyz") == b"xyz" and serialize(pb.UpdateChunk(data=b"a")) == b"\x12\x01a"


@pytest.mark.parametrize("garbage", [b"\x12\x05ab", b"\x12\xff", b"\x12" + b"\xff" * 11])
def test_truncated_or_lying_lengths_are_malformed(garbage):
    assert isinstance(chunk_parser(pb.UpdateChunk)(garbage), Malformed)


def test_assembler_fills_the_callers_tensor_and_refuses_a_wrong_size():
    parse = chunk_parser(pb.UpdateChunk)
    weights = torch.randn(1000)
    out = torch.empty(1000)
    assembler = TensorAssembler(tensor_header(weights), "x", out)
    for chunk in tensor_data_chunks(weights, 1024):
        assembler.add(chunk_data(parse(chunk), "x"))
    result = assembler.tensor()
    assert torch.equal(result, weights) and result.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError):
        TensorAssembler(tensor_header(weights), "x", torch.empty(999))
    header = pb.UpdateChunk(header=pb.UpdateHeader(client_id=3)).SerializeToString()
    with pytest.raises(WireError) as err:
        chunk_data(parse(header), "update from client 3")
    assert err.value.reason == "malformed"


def test_non_contiguous_tensors_travel_as_their_contiguous_bytes():
    parse = chunk_parser(pb.UpdateChunk)
    weights = torch.randn(10, 20, requires_grad=True).t()
    sent = b"".join(bytes(parse(c).data) for c in tensor_data_chunks(weights, 64))
    assert sent == weights.detach().contiguous().numpy().tobytes()
