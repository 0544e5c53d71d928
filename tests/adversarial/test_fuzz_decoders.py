"""Property-based fuzzing of every decoder a peer or a user can feed: whatever the bytes or the tables, each one
either returns what it decoded or raises its own named error, never anything else (a crash of a server thread, an
allocation of what a header claims before the bytes arrive). The long form runs with the `slow` marker."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.federated.config import FederatedRunConfig
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.wire import (
    DataChunk,
    Malformed,
    TensorAssembler,
    WireError,
    check_parts,
    chunk_parser,
    safe_parser,
    split_parts,
)
from plait.federated.secagg import messages
from plait.ps.wire import HEADER_BYTES, Header
from plait.settings.config import ConfigError, from_dict

EXAMPLES = int(os.environ.get("PLAIT_FUZZ_EXAMPLES", "120"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = [pb.RegisterRequest, pb.HeartbeatRequest, pb.TaskRequest, pb.UpdateChunk, pb.SecAggChunk, pb.TaskChunk]


@fuzz
@given(st.sampled_from(MESSAGES), st.binary(max_size=512))
def test_protobuf_messages_parse_or_are_malformed(message_type, data):
    parsed = safe_parser(message_type)(data)
    assert isinstance(parsed, (message_type, Malformed))
    chunk = chunk_parser(message_type)(data)
    assert isinstance(chunk, (message_type, DataChunk, Malformed))


part = st.builds(pb.TensorHeader, dtype=st.sampled_from(["float32", "float16", "int8", "int32", "float64", "", "x"]),
                 shape=st.lists(st.integers(-5, 300), max_size=3), num_bytes=st.integers(-10, 2000),
                 name=st.sampled_from(["values", "indices", "scale", ""]))


@fuzz
@given(st.lists(part, max_size=4), st.binary(max_size=3000))
def test_compressed_parts_are_checked_before_use(parts, data):
    try:
        total = check_parts(parts, 2000, "fuzz")
    except WireError as err:
        assert err.reason in ("malformed", "dtype", "shape", "oversized")
        return
    assert 0 <= total <= 2000
    if len(data) >= total:
        try:
            tensors = split_parts(data[:total], parts, "fuzz")
        except WireError as err:
            assert err.reason == "nonfinite"
            return
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == total


@fuzz
@given(st.integers(0, 64), st.lists(st.binary(max_size=40), max_size=6))
def test_a_tensor_stream_never_grows_past_its_header(num_floats, chunks):
    header = pb.TensorHeader(dtype="float32", shape=[num_floats], num_bytes=num_floats * 4)
    assembler = TensorAssembler(header, "fuzz")
    try:
        for chunk in chunks:
            assembler.add(chunk)
        tensor = assembler.tensor()
    except WireError as err:
        assert err.reason in ("oversized", "malformed", "nonfinite")
        return
    assert tensor.numel() == num_floats and bool(torch.isfinite(tensor).all())


@fuzz
@given(st.binary(max_size=600))
def test_secure_aggregation_messages_decode_or_say_why(data):
    try:
        messages.decode(data)
    except ValueError:
        pass


@fuzz
@given(st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES))
def test_parameter_server_headers_decode_or_say_why(data):
    try:
        header = Header.unpack(data)
    except ValueError:
        return
    assert Header.unpack(header.pack()) == header


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
tables = st.recursive(scalars, lambda inner: st.dictionaries(st.sampled_from(
    ["run", "fl", "data", "model", "rounds", "fraction", "name", "plan", "lr", "privacy", "mode", "source",
     "factory", "bounds", "max_norm", "num_clients", "strategy", "seed", "x"]), inner, max_size=4), max_leaves=12)


@fuzz
@given(tables)
def test_any_config_table_loads_or_names_the_problem(raw):
    if not isinstance(raw, dict):
        raw = {"fl": raw}
    try:
        from_dict(FederatedRunConfig, raw)
    except ConfigError:
        pass


@pytest.mark.slow
def test_the_long_fuzz_run(monkeypatch):
    import subprocess
    import sys
    env = {**os.environ, "PLAIT_FUZZ_EXAMPLES": "2000"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m",
                             "not slow"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
