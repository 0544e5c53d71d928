"""A single masked update reveals nothing usable: it looks uniform over the ring and is uncorrelated with the
raw update, while the unmasked encoding of the same update is neither (so the tests have power)."""

import math

import numpy as np
import torch
from scipy import stats

from plait.federated.secagg import SecAggClient, SecAggConfig, SecAggServer, crypto, fixedpoint

DIM = 50_000


def _masked_vector(raw, graph="complete", num_clients=5):
    config = SecAggConfig(graph=graph)
    server = SecAggServer(config, DIM, max_weight=1)
    server.begin(range(num_clients))
    clients = {c: SecAggClient(c, config) for c in range(num_clients)}
    for c in clients.values():
        server.receive_keys(c.advertise())
    for cid, msg in server.broadcast_keys().items():
        server.receive_shares(clients[cid].share_keys(msg))
    for cid, msg in server.forward_shares().items():
        clients[cid].receive_shares(msg)
    msg = clients[0].masked_input(raw, 1)
    return msg.masked[:-1], msg.bits


def _chi2_uniform(values_unit, bins=64):
    counts = np.histogram(values_unit, bins=bins, range=(0.0, 1.0))[0]
    return stats.chisquare(counts).pvalue


def test_masked_update_is_uniform_and_uncorrelated_with_the_raw_update():
    # Prepare: a structured update (a ramp plus noise) that is far from uniform in the ring
    gen = torch.Generator().manual_seed(0)
    raw = torch.linspace(-0.5, 0.5, DIM) + 0.05 * torch.randn(DIM, generator=gen)
    # Execute
    masked, bits = _masked_vector(raw)
    encoded = fixedpoint.encode(raw, 1, clip=1.0, scale=2.0**16, bits=bits)[:-1]
    # Assert: uniform over Z_{2^bits} (chi-square on 64 bins; the test fails by chance with p < 1e-6) ...
    masked_unit = masked.double().numpy() / 2.0**bits
    assert _chi2_uniform(masked_unit) > 1e-6
    assert _chi2_uniform(encoded.double().numpy() / 2.0**bits) < 1e-12    # control: the clear encoding is not
    # ... every bit is a fair coin ...
    bit_means = [((masked >> b) & 1).double().mean().item() for b in range(bits)]
    assert max(abs(m - 0.5) for m in bit_means) < 5 * 0.5 / math.sqrt(DIM)
    # ... and no linear relation to the raw values (|r| within 5 sigma of 0 for independent data)
    for reference in (raw.double().numpy(), encoded.double().numpy()):
        r = np.corrcoef(masked_unit, reference)[0, 1]
        assert abs(r) < 5 / math.sqrt(DIM)
    assert abs(np.corrcoef(encoded.double().numpy(), raw.double().numpy())[0, 1]) > 0.1   # control


def test_secagg_plus_masked_update_is_uniform_too():
    raw = torch.full((DIM,), 0.25)   # a constant update: the worst case for a weak mask
    masked, bits = _masked_vector(raw, graph="harary", num_clients=9)
    assert _chi2_uniform(masked.double().numpy() / 2.0**bits) > 1e-6
    # Repeats only as often as uniform draws collide (birthday bound), not from the constant input
    ring = 2.0**bits
    expected_repeats = DIM - ring * (1 - math.exp(-DIM / ring))
    repeats = DIM - len(torch.unique(masked))
    assert abs(repeats - expected_repeats) < 6 * math.sqrt(expected_repeats) + 3


def test_prg_is_deterministic_per_seed_and_distinct_across_seeds():
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    a1, a2, b = (crypto.expand(s, 10_000, 20) for s in (seed_a, seed_a, seed_b))
    assert torch.equal(a1, a2)
    assert (a1 == b).double().mean().item() < 0.01
    assert int(a1.min()) >= 0 and int(a1.max()) < 2**20
    wide = crypto.expand(seed_a, 10_000, 48)
    assert int(wide.max()) >= 2**46 and int(wide.min()) >= 0   # wide rings use 8-byte words, all bits used
