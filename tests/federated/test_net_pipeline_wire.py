"""Single-process checks of the network pipeline's pieces: a compressed update's parts are checked before use, the
pipeline fingerprint tells configs apart, and the server's secure-aggregation round (outbox, byte messages) runs
with in-process client halves to the plain weighted mean and refuses a message sent in another client's name."""

from __future__ import annotations

import asyncio

import pytest
import torch

from plait.core.compress import make_codec
from plait.federated.config import FLConfig
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.pipeline import pipeline_fingerprint
from plait.federated.net.secagg_round import ADVERTISE, TRAIN, SecAggRound
from plait.federated.net.wire import WireError, check_parts, part_headers, split_parts
from plait.federated.pipeline import CompressionConfig
from plait.federated.secagg import SecAggClient, SecAggConfig, SecAggError, messages
from plait.federated.strategy import StrategyConfig


def test_topk_parts_round_trip_and_bad_parts_are_refused():
    delta = torch.tensor([0.0, -3.0, 0.5, 2.0])
    enc = make_codec("topk", ratio=0.5).encode(delta)
    parts = part_headers(enc.tensors)
    buffer = bytearray(b"".join(t.numpy().tobytes() for t in enc.tensors.values()))
    assert check_parts(parts, 64, "update") == len(buffer) == enc.nbytes == 2 * 4 + 2 * 4
    tensors = split_parts(buffer, parts, "update")
    assert torch.equal(make_codec("topk").decode(type(enc)("topk", (4,), torch.float32, tensors)),
                       torch.tensor([0.0, -3.0, 0.0, 2.0]))
    with pytest.raises(WireError, match="more than an uncompressed update") as err:
        check_parts(parts, 8, "update")
    assert err.value.reason == "oversized"
    bad = [pb.TensorHeader(name="values", dtype="float64", shape=[2], num_bytes=16)]
    with pytest.raises(WireError, match="dtype 'float64'"):
        check_parts(bad, 64, "update")
    lying = [pb.TensorHeader(name="values", dtype="float32", shape=[2], num_bytes=12)]
    with pytest.raises(WireError, match="declares 12 bytes"):
        check_parts(lying, 64, "update")
    nan = [pb.TensorHeader(name="values", dtype="float32", shape=[1], num_bytes=4)]
    with pytest.raises(WireError, match="NaN"):
        split_parts(bytearray(torch.tensor([float("nan")]).numpy().tobytes()), nan, "update")


def test_pipeline_fingerprint_differs_when_a_client_stage_differs():
    base = FLConfig()
    assert pipeline_fingerprint(base) == pipeline_fingerprint(FLConfig())
    assert pipeline_fingerprint(base) != pipeline_fingerprint(FLConfig(compression=CompressionConfig(codec="int8")))
    secagg = FLConfig(strategy=StrategyConfig(name="secagg"))
    assert pipeline_fingerprint(secagg) != pipeline_fingerprint(
        FLConfig(strategy=StrategyConfig(name="secagg", secagg=SecAggConfig(threshold=0.9))))


def test_secagg_round_with_byte_messages_gives_the_weighted_mean_and_refuses_impersonation():
    # Prepare: the server half with its outbox; three client halves fetch and answer through bytes only.
    dim, selected = 6, [0, 1, 2]
    deltas = {cid: torch.linspace(-0.3, 0.3, dim) * (cid + 1) for cid in selected}  # within secagg.clip
    weights = {0: 3, 1: 1, 2: 2}
    rnd = SecAggRound(StrategyConfig(name="secagg"), dim, selected, seed=1, round_idx=4)
    clients = {cid: SecAggClient(cid, SecAggConfig()) for cid in selected}
    refused = []

    def serve_clients():
        for cid, client in clients.items():
            while (item := rnd.next_item(cid)) is not None:
                if item is TRAIN:
                    data = messages.encode(client.masked_input(deltas[cid], weights[cid]))
                else:
                    rnd.sent(cid, item)
                    reply = client.respond(None if item == ADVERTISE else messages.decode(item))
                    if reply is None:
                        continue
                    data = messages.encode(reply)
                    if cid == 2 and item == ADVERTISE:  # client 1 replays client 2's keys as its own
                        with pytest.raises(SecAggError, match="naming client 2 sent by client 1"):
                            rnd.receive(1, data)
                        refused.append(cid)
                rnd.receive(cid, data)

    async def wait(pending, enough):
        serve_clients()
        assert not pending() or enough()

    # Execute
    outcome = asyncio.run(rnd.run(selected, 3, wait, set()))
    # Assert: exactly the weighted sum (within fixed-point error), traffic counted, the impersonation refused.
    expected = sum(weights[c] * deltas[c] for c in selected)
    assert outcome.total_weight == 6 and outcome.dropped == ()
    torch.testing.assert_close(outcome.weighted_sum, expected.double(), rtol=0, atol=3 * 0.5 / 2**16)
    assert refused == [2] and rnd.bytes_up > 0 and rnd.bytes_down > 0 and not rnd.outbox
