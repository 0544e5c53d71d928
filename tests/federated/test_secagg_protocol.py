"""The secure-aggregation round end to end, in-process: the unmasked sum equals the plain sum within the
quantisation error, with dropouts after key sharing and during unmasking, for SecAgg and SecAgg+."""

import pytest
import torch

from plait.federated.client_update import Update
from plait.federated.secagg import SecAggClient, SecAggConfig, SecAggError, SecAggServer, SecureAggregator, Stage
from plait.federated.secagg.messages import AdvertiseKeys, SharesForward

SCALE = 2.0**12


def _updates(num_clients, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {cid: Update(torch.randn(dim, generator=gen) * 0.2, int(torch.randint(1, 50, (), generator=gen)))
            for cid in range(num_clients)}


def _run(config, updates, *, dropped=(), unresponsive=(), wire=False, seed=0):
    agg = SecureAggregator(next(iter(updates.values())).delta.numel(), config, seed=seed, wire=wire)
    agg.begin(updates)
    for cid, update in updates.items():
        if cid not in dropped:
            agg.add(cid, update)
    agg.result(unresponsive=unresponsive)
    return agg


def _plain_weighted_sum(updates, ids):
    return sum(updates[c].delta.double() * updates[c].num_examples for c in ids), sum(updates[c].num_examples
                                                                                      for c in ids)


def _assert_secure_sum_matches(agg, updates, expected_ids):
    out = agg.outcome
    plain, weight = _plain_weighted_sum(updates, expected_ids)
    assert out.survivors == tuple(sorted(expected_ids))
    assert out.total_weight == weight                       # integer weights are exact
    # Each client rounds n_k * delta to 1 / scale: the error of the sum is at most survivors * 0.5 / scale.
    err = (out.weighted_sum - plain).abs().max().item()
    assert err <= len(expected_ids) * 0.5 / SCALE
    assert err > 0 or SCALE > 2**40                         # quantisation really happened (not a plain path)


@pytest.mark.parametrize("graph", ["complete", "harary"])
def test_secure_sum_equals_plain_sum_without_dropouts(graph):
    # Prepare: 8 clients, 3,000 values each
    updates = _updates(8, 3000)
    config = SecAggConfig(scale=SCALE, graph=graph, neighbours=4 if graph == "harary" else 0)
    # Execute
    agg = _run(config, updates)
    # Assert
    _assert_secure_sum_matches(agg, updates, range(8))
    assert agg.outcome.dropped == () and agg.stage is Stage.DONE


@pytest.mark.parametrize("num_dropped", [1, 4])
def test_dropouts_after_key_sharing_up_to_n_minus_t(num_dropped):
    # Prepare: n = 8, threshold 0.5 -> t = 4, so up to n - t = 4 clients may vanish after SHARE_KEYS
    updates = _updates(8, 2000, seed=num_dropped)
    config = SecAggConfig(scale=SCALE)
    dropped = set([1, 6, 3, 4][:num_dropped])
    # Execute
    agg = _run(config, updates, dropped=dropped)
    # Assert: the sum is over survivors only, their pairwise masks with the dropped were removed
    assert agg.server.state.threshold == 4
    _assert_secure_sum_matches(agg, updates, [c for c in range(8) if c not in dropped])
    assert agg.outcome.dropped == tuple(sorted(dropped))


def test_dropouts_after_masking_and_after_sharing_together():
    # Prepare: 2 drop before masking, then 2 of the 6 that masked never answer the unmask request (6 - 2 >= t = 4)
    updates = _updates(8, 2000, seed=3)
    # Execute
    agg = _run(SecAggConfig(scale=SCALE), updates, dropped={0, 5}, unresponsive={2, 7})
    # Assert: the late dropouts' inputs are in the sum (their self-masks were rebuilt from others' shares)
    _assert_secure_sum_matches(agg, updates, [1, 2, 3, 4, 6, 7])


def test_too_many_dropouts_is_a_clear_error():
    updates = _updates(8, 100)
    # n - t + 1 = 5 dropouts before masking: the server stops at the unmask request, naming the stage
    with pytest.raises(SecAggError, match=r"too many dropouts.*threshold is 4.*stage COLLECT_MASKED"):
        _run(SecAggConfig(scale=SCALE), updates, dropped={0, 1, 2, 3, 4})
    # 3 dropouts, then 2 of the 5 survivors silent: 3 < t answers
    with pytest.raises(SecAggError, match=r"too many dropouts.*stage UNMASK"):
        _run(SecAggConfig(scale=SCALE), updates, dropped={0, 1, 2}, unresponsive={3, 4})


def test_secagg_plus_with_neighbours_and_dropouts():
    # Prepare: 40 clients, k = 6 neighbours each (t = 4 of 7 holders); 3 clients drop after sharing, 1 is silent
    updates = _updates(40, 1000, seed=7)
    config = SecAggConfig(scale=SCALE, graph="harary", neighbours=6)
    full = _run(SecAggConfig(scale=SCALE), updates)
    # Execute
    agg = _run(config, updates, dropped={5, 17, 33}, unresponsive={21})
    # Assert: a 6-regular graph, the sum over the 37 survivors, and far less traffic than full SecAgg
    degrees = {len(v) for v in agg.server.state.neighbours.values()}
    assert degrees == {6} and agg.server.state.threshold == 4
    _assert_secure_sum_matches(agg, updates, [c for c in range(40) if c not in {5, 17, 33}])
    assert agg.traffic()["bytes_down"] < full.traffic()["bytes_down"] / 3   # keys and shares: O(k), not O(n)


def test_wire_encoding_gives_the_same_result_and_traffic():
    # Masks differ between runs (fresh keys) but cancel exactly, so the unmasked result is bit-identical.
    updates = _updates(6, 777, seed=2)
    direct = _run(SecAggConfig(scale=SCALE), updates, dropped={4})
    wired = _run(SecAggConfig(scale=SCALE), updates, dropped={4}, wire=True)
    assert torch.equal(direct.outcome.weighted_sum, wired.outcome.weighted_sum)
    assert direct.traffic() == wired.traffic()   # computed sizes == encoded lengths


def test_messages_out_of_order_or_forged_are_rejected():
    config = SecAggConfig(scale=SCALE)
    server = SecAggServer(config, 10, max_weight=100)
    server.begin([0, 1, 2])
    clients = {c: SecAggClient(c, config) for c in range(3)}
    with pytest.raises(SecAggError, match="masked input in stage SETUP, expected stage COLLECT_MASKED"):
        clients[0].masked_input(torch.zeros(10), 1)
    for c in clients.values():
        server.receive_keys(c.advertise())
    with pytest.raises(SecAggError, match="repeated AdvertiseKeys from client 1"):
        server.receive_keys(AdvertiseKeys(1, b"\x01" * 32, b"\x02" * 32))
    boxes = server.broadcast_keys()
    shares = {c: clients[c].share_keys(boxes[c]) for c in clients}
    for msg in shares.values():
        server.receive_shares(msg)
    forwards = server.forward_shares()
    # A flipped bit in a ciphertext fails authentication and names the sender and the stage.
    forged = dict(forwards[0].ciphertexts)
    forged[2] = forged[2][:-1] + bytes([forged[2][-1] ^ 1])
    with pytest.raises(SecAggError, match="share from client 2 does not decrypt.*SHARE_KEYS"):
        clients[0].receive_shares(SharesForward(forged))
    # A share replayed to another recipient fails too (the AAD binds sender and recipient).
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[1].receive_shares(SharesForward({2: forwards[0].ciphertexts[2], 0: forwards[1].ciphertexts[0]}))


def test_client_refuses_a_threshold_below_its_config():
    config = SecAggConfig(scale=SCALE, threshold=0.75)
    server = SecAggServer(SecAggConfig(scale=SCALE, threshold=0.3), 10, max_weight=1)
    server.begin(range(8))
    clients = {c: SecAggClient(c, config) for c in range(8)}
    for c in clients.values():
        server.receive_keys(c.advertise())
    boxes = server.broadcast_keys()   # the server asks for t = 3 of 8; the client wants at least 6
    with pytest.raises(SecAggError, match="threshold 3 .*secagg.threshold allows 6..8"):
        clients[0].share_keys(boxes[0])


def test_client_that_never_shares_keys_is_left_out_of_every_mask():
    # Prepare: 6 clients advertise keys; client 2 vanishes before SHARE_KEYS, so nobody masks with it
    config = SecAggConfig(scale=SCALE)
    updates = _updates(6, 500, seed=11)
    server = SecAggServer(config, 500, max_weight=config.max_weight)
    server.begin(range(6))
    clients = {c: SecAggClient(c, config) for c in range(6)}
    for c in clients.values():
        server.receive_keys(c.advertise())
    for cid, msg in server.broadcast_keys().items():
        reply = clients[cid].share_keys(msg)
        if cid != 2:
            server.receive_shares(reply)
    # Execute
    forwards = server.forward_shares()
    for cid, msg in forwards.items():
        clients[cid].receive_shares(msg)
        server.receive_masked(clients[cid].masked_input(updates[cid].delta, updates[cid].num_examples))
    for cid, msg in server.request_unmask().items():
        server.receive_unmask(clients[cid].unmask(msg))
    out = server.finish()
    # Assert: client 2 got no shares, is neither survivor nor dropout, and the sum is over the other five
    assert 2 not in forwards and all(2 not in m.ciphertexts for m in forwards.values())
    plain, weight = _plain_weighted_sum(updates, [0, 1, 3, 4, 5])
    assert out.survivors == (0, 1, 3, 4, 5) and out.dropped == () and out.total_weight == weight
    assert (out.weighted_sum - plain).abs().max().item() <= 5 * 0.5 / SCALE
