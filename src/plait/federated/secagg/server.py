"""The server half of secure aggregation: routes keys and encrypted shares, sums masked vectors, and unmasks
only their sum. Its state lives in `ServerState`; it never sees a single client's update in the clear, and never
holds more than one running sum (the masked vectors are folded in as they arrive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plait.federated.secagg import crypto, fixedpoint, graph, shamir
from plait.federated.secagg.config import SecAggConfig
from plait.federated.secagg.messages import (
    AdvertiseKeys,
    EncryptedShares,
    KeysBroadcast,
    MaskedInput,
    SharesForward,
    UnmaskRequest,
    UnmaskShares,
)
from plait.federated.secagg.protocol import SecAggError, Stage, expect, pair_info, pair_sign


@dataclass(slots=True)
class ServerState:
    round_id: int
    dim: int                                   # masked vector length: update + 1 (the weight)
    stage: Stage = Stage.SETUP
    bits: int = 0
    threshold: int = 0
    expected: frozenset[int] = frozenset()     # clients selected for the round
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)   # U1: id -> (enc, mask)
    neighbours: dict[int, tuple[int, ...]] = field(default_factory=dict)
    mailbox: dict[int, dict[int, bytes]] = field(default_factory=dict)          # recipient -> sender -> share
    shared: set[int] = field(default_factory=set)                              # U2
    masked_sum: torch.Tensor | None = None
    masked: set[int] = field(default_factory=set)                              # U3
    responses: dict[int, UnmaskShares] = field(default_factory=dict)           # U4


@dataclass(frozen=True, slots=True)
class SecureSum:
    weighted_sum: torch.Tensor   # float64 [dim - 1]: sum over survivors of n_k * delta_k (dequantised)
    total_weight: int            # sum over survivors of n_k
    survivors: tuple[int, ...]   # clients whose input is in the sum (U3)
    dropped: tuple[int, ...]     # clients that shared keys but sent no input (their pair masks were removed)


class SecAggServer:
    def __init__(self, config: SecAggConfig, vector_len: int, *, max_weight: int, round_id: int = 0,
                 graph_seed: int = 0):
        self.config, self.max_weight, self.graph_seed = config, max_weight, graph_seed
        self.state = ServerState(round_id=round_id, dim=vector_len + 1)

    def begin(self, client_ids) -> None:
        """SETUP -> ADVERTISE_KEYS: the round's clients are known; fix the ring so their sum fits."""
        st = self.state
        expect(st.stage, Stage.SETUP, "server", "begin")
        st.expected = frozenset(int(c) for c in client_ids)
        if len(st.expected) < 2:
            raise SecAggError(f"secagg server: secure aggregation needs at least 2 clients, got {len(st.expected)}")
        st.bits = self.config.ring_bits(len(st.expected), self.max_weight)
        st.stage = Stage.ADVERTISE_KEYS

    def receive_keys(self, msg: AdvertiseKeys) -> None:
        st = self.state
        expect(st.stage, Stage.ADVERTISE_KEYS, "server", f"AdvertiseKeys from client {msg.client_id}")
        if msg.client_id not in st.expected or msg.client_id in st.public_keys:
            raise SecAggError(f"secagg server: unexpected or repeated AdvertiseKeys from client {msg.client_id}")
        st.public_keys[msg.client_id] = (msg.enc_key, msg.mask_key)

    def broadcast_keys(self) -> dict[int, KeysBroadcast]:
        """ADVERTISE_KEYS -> SHARE_KEYS: build the neighbour graph over U1; each client gets its neighbours' keys."""
        st = self.state
        expect(st.stage, Stage.ADVERTISE_KEYS, "server", "broadcast_keys")
        if len(st.public_keys) < 2:
            raise SecAggError(f"secagg server: only {len(st.public_keys)} clients advertised keys, need >= 2 "
                              "(stage ADVERTISE_KEYS)")
        degree = self.config.degree(len(st.public_keys))
        st.neighbours = graph.neighbours(list(st.public_keys), degree, self.graph_seed)
        st.threshold = self.config.threshold_of(degree + 1)
        st.stage = Stage.SHARE_KEYS
        return {cid: KeysBroadcast(st.round_id, st.threshold, st.bits, st.dim,
                                   {v: st.public_keys[v] for v in near})
                for cid, near in st.neighbours.items()}

    def receive_shares(self, msg: EncryptedShares) -> None:
        st = self.state
        expect(st.stage, Stage.SHARE_KEYS, "server", f"EncryptedShares from client {msg.client_id}")
        if msg.client_id not in st.neighbours or msg.client_id in st.shared:
            raise SecAggError(f"secagg server: unexpected or repeated EncryptedShares from client {msg.client_id}")
        if set(msg.ciphertexts) != set(st.neighbours[msg.client_id]):
            raise SecAggError(f"secagg server: client {msg.client_id} sent shares to {sorted(msg.ciphertexts)}, "
                              f"its neighbours are {list(st.neighbours[msg.client_id])} (stage SHARE_KEYS)")
        for recipient, ciphertext in msg.ciphertexts.items():
            st.mailbox.setdefault(recipient, {})[msg.client_id] = ciphertext
        st.shared.add(msg.client_id)

    def forward_shares(self) -> dict[int, SharesForward]:
        """SHARE_KEYS -> COLLECT_MASKED: clients that shared (U2) get the shares addressed to them."""
        st = self.state
        expect(st.stage, Stage.SHARE_KEYS, "server", "forward_shares")
        for cid in st.shared:
            holders = 1 + sum(v in st.shared for v in st.neighbours[cid])
            if holders < st.threshold:
                raise SecAggError(f"secagg server: client {cid} has {holders} share holders left, fewer than the "
                                  f"threshold {st.threshold}: too many dropouts (stage SHARE_KEYS)")
        st.masked_sum = torch.zeros(st.dim, dtype=torch.int64)
        st.stage = Stage.COLLECT_MASKED
        return {cid: SharesForward({v: c for v, c in st.mailbox.get(cid, {}).items() if v in st.shared})
                for cid in sorted(st.shared)}

    def receive_masked(self, msg: MaskedInput) -> None:
        """Fold one masked vector into the running sum (mod 2^bits); the vector itself is not kept."""
        st = self.state
        expect(st.stage, Stage.COLLECT_MASKED, "server", f"MaskedInput from client {msg.client_id}")
        if msg.client_id not in st.shared or msg.client_id in st.masked:
            raise SecAggError(f"secagg server: unexpected or repeated MaskedInput from client {msg.client_id} "
                              "(stage COLLECT_MASKED)")
        if msg.bits != st.bits or msg.masked.shape != (st.dim,) or msg.masked.dtype != torch.int64:
            raise SecAggError(f"secagg server: MaskedInput from client {msg.client_id} is {msg.masked.numel()} "
                              f"elements of {msg.bits} bits, expected {st.dim} of {st.bits} (stage COLLECT_MASKED)")
        assert st.masked_sum is not None
        st.masked_sum.add_(msg.masked).bitwise_and_(fixedpoint.ring_mask(st.bits))
        st.masked.add(msg.client_id)

    def request_unmask(self) -> dict[int, UnmaskRequest]:
        """COLLECT_MASKED -> UNMASK: tell each survivor which of its partners survived (U3)."""
        st = self.state
        expect(st.stage, Stage.COLLECT_MASKED, "server", "request_unmask")
        self._check_holders(st.masked, "sent masked input", Stage.COLLECT_MASKED)
        st.stage = Stage.UNMASK
        return {cid: UnmaskRequest(tuple(sorted({cid, *(v for v in st.neighbours[cid] if v in st.masked)})))
                for cid in sorted(st.masked)}

    def receive(self, msg) -> None:
        """Any client-to-server message, by its type (a network transport's single entry point)."""
        handlers = {AdvertiseKeys: self.receive_keys, EncryptedShares: self.receive_shares,
                    MaskedInput: self.receive_masked, UnmaskShares: self.receive_unmask}
        handler = handlers.get(type(msg))
        if handler is None:
            raise SecAggError(f"secagg server: a {type(msg).__name__} is not a message from a client "
                              f"(stage {self.state.stage.name})")
        handler(msg)

    def receive_unmask(self, msg: UnmaskShares) -> None:
        st = self.state
        expect(st.stage, Stage.UNMASK, "server", f"UnmaskShares from client {msg.client_id}")
        cid = msg.client_id
        if cid not in st.masked or cid in st.responses:
            raise SecAggError(f"secagg server: unexpected or repeated UnmaskShares from client {cid} (stage UNMASK)")
        holders_of = {cid, *st.neighbours[cid]}
        dropped = (st.shared - st.masked) & holders_of
        if set(msg.self_mask_shares) != st.masked & holders_of or set(msg.key_shares) != dropped:
            raise SecAggError(f"secagg server: client {cid} sent shares for the wrong clients (stage UNMASK)")
        st.responses[cid] = msg

    def finish(self) -> SecureSum:
        """UNMASK -> DONE: rebuild self-mask seeds of survivors and mask keys of dropouts; unmask the sum."""
        st = self.state
        expect(st.stage, Stage.UNMASK, "server", "finish")
        self._check_holders(set(st.responses), "answered the unmask request", Stage.UNMASK)
        assert st.masked_sum is not None
        total, bits = st.masked_sum, st.bits
        masks = [(shamir.to_bytes(self._rebuild(cid, "self_mask_shares")), -1) for cid in sorted(st.masked)]
        dropped = sorted(st.shared - st.masked)
        for cid in dropped:
            key_value = self._rebuild(cid, "key_shares")
            key = crypto.private_key_from_int(key_value)
            if crypto.public_bytes(key) != st.public_keys[cid][1]:
                raise SecAggError(f"secagg server: the mask key rebuilt for dropped client {cid} does not match "
                                  "its advertised public key: a share was corrupted (stage UNMASK)")
            # Each surviving partner u added sign(u, cid) * PRG(s_{u,cid}); cid's own half never arrived.
            for peer in st.neighbours[cid]:
                if peer in st.masked:
                    seed = crypto.agree(key, st.public_keys[peer][1], pair_info(b"mask", st.round_id, peer, cid))
                    masks.append((seed, -pair_sign(peer, cid)))
        crypto.add_masks_(total, masks, bits)
        weighted_sum, weight = fixedpoint.decode(total, scale=self.config.scale, bits=bits)
        st.masked_sum = None
        st.stage = Stage.DONE
        return SecureSum(weighted_sum, weight, tuple(sorted(st.masked)), tuple(dropped))

    def _check_holders(self, alive: set[int], did: str, stage: Stage) -> None:
        """Every secret still needed must have >= t holders among `alive` clients, or the round fails here."""
        st = self.state
        if len(st.masked) < 2:
            raise SecAggError(f"secagg server: only {len(st.masked)} clients sent masked input; a sum of fewer "
                              f"than 2 would reveal an update (stage {stage.name})")
        for cid in sorted(st.shared):
            holders = len(({cid} | set(st.neighbours[cid])) & alive & st.masked)
            if holders < st.threshold:
                raise SecAggError(
                    f"secagg server: too many dropouts: only {holders} holders of client {cid}'s shares "
                    f"{did}, the threshold is {st.threshold} ({len(st.shared)} clients shared keys, "
                    f"{len(st.masked)} sent masked input; secagg.threshold = {self.config.threshold}) "
                    f"(stage {stage.name})")

    def _rebuild(self, owner: int, kind: str) -> int:
        st = self.state
        holders = [h for h in sorted(st.responses) if owner in getattr(st.responses[h], kind)]
        if len(holders) < st.threshold:
            raise SecAggError(f"secagg server: {len(holders)} shares of client {owner}'s {kind} < threshold "
                              f"{st.threshold} (stage UNMASK)")
        holders = holders[: st.threshold]
        shares = [[getattr(st.responses[h], kind)[owner]] for h in holders]
        return shamir.reconstruct([h + 1 for h in holders], shares, st.threshold)[0]
