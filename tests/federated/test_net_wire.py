"""Pure pieces of the network transport: chunked tensors, header checks, signatures and replays, certificates,
the [net] config."""

from __future__ import annotations

import math

import pytest
import torch
from cryptography import x509

from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import Verifier, derive_client_key, sign
from plait.federated.net.certs import make_certs
from plait.federated.net.config import NetSection, NetworkRunConfig
from plait.federated.net.local import small_config
from plait.federated.net.wire import (
    Malformed,
    TensorAssembler,
    WireError,
    check_header,
    iter_chunks,
    safe_parser,
    tensor_header,
)
from plait.settings.config import ConfigError, from_dict


def test_chunks_round_trip_bytes_exactly():
    tensor = torch.randn(1000)
    chunks = list(iter_chunks(tensor, 1024))
    assert [len(c) for c in chunks] == [1024, 1024, 1024, 928]  # 4000 bytes in 1 KiB pieces
    assembler = TensorAssembler(tensor_header(tensor), "test")
    for chunk in chunks:
        assembler.add(chunk)
    assert torch.equal(assembler.tensor(), tensor)


@pytest.mark.parametrize(("header", "reason"), [
    (pb.TensorHeader(dtype="float64", shape=[10], num_bytes=80), "dtype"),
    (pb.TensorHeader(dtype="float32", shape=[9], num_bytes=36), "shape"),
    (pb.TensorHeader(dtype="float32", shape=[2, 5], num_bytes=40), "shape"),
    (pb.TensorHeader(dtype="float32", shape=[10], num_bytes=1 << 40), "oversized"),
    (pb.TensorHeader(dtype="float32", shape=[10], num_bytes=8), "malformed"),
])
def test_header_checks_name_the_reason(header, reason):
    with pytest.raises(WireError) as err:
        check_header(header, 10, "update from client 1")
    assert err.value.reason == reason and "client 1" in str(err.value)


def test_assembler_refuses_extra_short_and_nonfinite_streams():
    header = pb.TensorHeader(dtype="float32", shape=[4], num_bytes=16)
    long = TensorAssembler(header, "x")
    long.add(bytes(12))
    with pytest.raises(WireError, match="more than the 16 bytes") as err:
        long.add(bytes(8))
    assert err.value.reason == "oversized"
    short = TensorAssembler(header, "x")
    short.add(bytes(12))
    with pytest.raises(WireError, match="12 of 16") as err:
        short.tensor()
    assert err.value.reason == "malformed"
    nan = TensorAssembler(header, "x")
    nan.add(torch.tensor([1.0, math.nan, math.inf, 2.0]).numpy().tobytes())
    with pytest.raises(WireError, match="2 NaN/Inf") as err:
        nan.tensor()
    assert err.value.reason == "nonfinite"


def test_safe_parser_returns_malformed_instead_of_raising():
    parse = safe_parser(pb.RegisterRequest)
    assert parse(pb.RegisterRequest(client_id=7).SerializeToString()).client_id == 7
    bad = parse(b"\x0a\xff\xff\xff")  # field 1, length-delimited, with a length running past the end
    assert isinstance(bad, Malformed) and bad.type_name == "RegisterRequest"


def test_signatures_refuse_missing_forged_wrong_client_and_replayed():
    master = bytes(range(32))
    verifier = Verifier(master, window_s=60)
    metadata = dict(sign(derive_client_key(master, 4), "Register", 4))
    verifier.verify("Register", metadata, 4)
    for bad, reason, message in [
        ({}, "unauthenticated", "unsigned"),
        (dict(sign(b"k" * 32, "Register", 4)), "unauthenticated", "bad signature"),
        (dict(sign(derive_client_key(master, 4), "Register", 4)), "unauthenticated", "names 5"),
        (dict(sign(derive_client_key(master, 4), "Heartbeat", 4)), "unauthenticated", "bad signature"),
        (metadata, "replay", "nonce already used"),
    ]:
        client = 5 if message == "names 5" else 4
        with pytest.raises(WireError, match=message) as err:
            verifier.verify("Register", bad, client)
        assert err.value.reason == reason
    old = dict(sign(derive_client_key(master, 4), "Register", 4))
    old["x-plait-time"] = "1000.0"  # a captured request from long ago (its signature no longer matches either)
    with pytest.raises(WireError):
        verifier.verify("Register", old, 4)


def test_certs_make_a_ca_signed_server_and_client_identities(tmp_path):
    out = make_certs(tmp_path / "certs", 2, hosts=("localhost", "127.0.0.1"))
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((out / "clients" / "client-1.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert client.subject.rfc4514_string().startswith("CN=client-1")
    master = bytes.fromhex((out / "server.secret").read_text())
    assert (out / "clients" / "client-1.key").read_text().strip() == derive_client_key(master, 1).hex()
    assert (out / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable
    with pytest.raises(FileExistsError):
        make_certs(out, 1)


def test_net_config_refuses_clear_text_off_loopback_and_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="net.tls = 'off' is refused"):
        NetSection(host="0.0.0.0", tls="off", cert_dir="c")
    with pytest.raises(ValueError, match="net.auth = 'none' is refused"):
        NetSection(host="0.0.0.0", auth="none", cert_dir="c")
    assert NetSection(host="0.0.0.0", cert_dir="c").use_tls  # auto: on off loopback
    assert not NetSection(host="127.0.0.1", cert_dir="c").use_tls
    with pytest.raises(ValueError, match="net.cert_dir is required"):
        NetSection(tls="on", auth="none")
    raw = small_config(tmp_path)
    raw["net"]["heartbeat_sec"] = 1
    with pytest.raises(ConfigError, match="net.heartbeat_sec"):
        from_dict(NetworkRunConfig, raw)
    raw = small_config(tmp_path, wait_for_clients=1)
    with pytest.raises(ConfigError, match="wait_for_clients"):
        from_dict(NetworkRunConfig, raw)
