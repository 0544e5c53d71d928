"""Fixed-point encoding, bit packing and message encoding: exact round trips, sizes as computed, bad input
rejected."""

import pytest
import torch

from plait.federated.secagg import SecAggConfig, fixedpoint, messages
from plait.settings.config import ConfigError, from_dict


def test_encode_decode_against_hand_computed_values():
    # weight 3, scale 4: 3 * [0.5, -0.25, 2.0 -> clip 1.0] * 4 = [6, -3, 12]; -3 wraps to 2^8 - 3 = 253
    ring = fixedpoint.encode(torch.tensor([0.5, -0.25, 2.0]), 3, clip=1.0, scale=4.0, bits=8)
    assert ring.tolist() == [6, 253, 12, 3]
    total, weight = fixedpoint.decode((ring + ring) & 255, scale=4.0, bits=8)
    assert total.tolist() == [3.0, -1.5, 6.0] and weight == 6


@pytest.mark.parametrize("bits", [8, 13, 23, 32, 33, 62])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (1001,), generator=gen, dtype=torch.int64)
    data = fixedpoint.pack(values, bits)
    assert len(data) == fixedpoint.packed_size(1001, bits) == -(-1001 * bits // 8)
    assert torch.equal(fixedpoint.unpack(data, 1001, bits), values)
    with pytest.raises(ValueError, match="bytes"):
        fixedpoint.unpack(data[:-1], 1001, bits)


def test_every_message_round_trips_and_wire_size_is_its_length():
    key = bytes(range(32))
    samples = [
        messages.AdvertiseKeys(3, key, key[::-1]),
        messages.KeysBroadcast(7, 4, 23, 101, {1: (key, key), 9: (key[::-1], key)}),
        messages.EncryptedShares(3, {1: b"x" * 92, 9: b"y" * 92}),
        messages.SharesForward({1: b"z" * 92}),
        messages.UnmaskRequest((1, 3, 9)),
        messages.UnmaskShares(3, {1: 5, 3: 2**254}, {9: 17}),
    ]
    for msg in samples:
        data = messages.encode(msg)
        assert len(data) == msg.wire_size()
        assert messages.decode(data) == msg
    masked = messages.MaskedInput(3, 23, torch.randint(0, 2**23, (101,)))
    data = messages.encode(masked)
    back = messages.decode(data)
    assert len(data) == masked.wire_size() and back.client_id == 3 and torch.equal(back.masked, masked.masked)


def test_decode_rejects_garbage():
    good = messages.encode(messages.UnmaskRequest((1, 2)))
    with pytest.raises(ValueError, match="bad header"):
        messages.decode(b"PK" + good[2:])
    with pytest.raises(ValueError, match="truncated"):
        messages.decode(good[:-1])
    with pytest.raises(ValueError, match="trailing"):
        messages.decode(good + b"\0")


def test_config_validates_and_loads_from_a_table():
    config = from_dict(SecAggConfig, {"threshold": 0.6, "graph": "harary", "neighbours": 8, "scale": 1024})
    assert config.degree(100) == 8 and config.threshold_of(9) == 6
    assert SecAggConfig(graph="harary").degree(100) == 14          # 2 * ceil(log2 100)
    assert SecAggConfig().degree(100) == 99
    with pytest.raises(ConfigError, match="unknown config key 'neighbors'"):
        from_dict(SecAggConfig, {"neighbors": 8})
    with pytest.raises(ValueError, match="secagg.threshold"):
        SecAggConfig(threshold=0)
    with pytest.raises(ValueError, match="secagg.neighbours is only used"):
        SecAggConfig(neighbours=4)
    # 100 clients of weight <= 1 at 16 bits signed need 23 bits; an explicit 20-bit ring is refused
    assert SecAggConfig(scale=2**15 - 1, clip=1.0).ring_bits(100, 1) == 23
    with pytest.raises(ValueError, match="secagg.modulus_bits = 20 is too small for 100 clients"):
        SecAggConfig(scale=2**15 - 1, modulus_bits=20).ring_bits(100, 1)
