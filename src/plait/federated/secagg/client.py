"""The client half of secure aggregation: a state machine that turns server messages into replies.

It holds its secrets (two X25519 private keys, the self-mask seed, the shares it was given) in `ClientState` and
shares nothing in memory with the server: every input and output is a message from `messages`.
"""

from __future__ import annotations

import secrets as _csprng
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from plait.federated.secagg import crypto, fixedpoint, shamir
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
from plait.federated.secagg.protocol import SecAggError, Stage, expect, pair_info, pair_sign, share_aad


@dataclass(slots=True)
class ClientState:
    client_id: int
    stage: Stage = Stage.SETUP
    enc_key: X25519PrivateKey | None = None     # c_u: agrees the keys that encrypt shares
    mask_key: X25519PrivateKey | None = None    # s_u: agrees the pairwise mask seeds
    mask_key_value: int = 0                     # s_u's bytes as a field element (what gets shared)
    self_seed: int = 0                          # b_u, expanded into the self-mask
    round_id: int = 0
    threshold: int = 0
    bits: int = 0
    dim: int = 0
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    share_keys: dict[int, bytes] = field(default_factory=dict)   # neighbour -> AES key for shares (both ways)
    held_shares: dict[int, tuple[int, int]] = field(default_factory=dict)  # owner -> (share of b, share of s)
    partners: tuple[int, ...] = ()              # neighbours that shared keys (U2 ∩ N(u)): the pair masks


class SecAggClient:
    def __init__(self, client_id: int, config: SecAggConfig):
        self.config = config
        self.state = ClientState(client_id)

    @property
    def _who(self) -> str:
        return f"client {self.state.client_id}"

    def advertise(self) -> AdvertiseKeys:
        """SETUP -> ADVERTISE_KEYS: fresh key pairs for this round only."""
        st = self.state
        expect(st.stage, Stage.SETUP, self._who, "advertise")
        st.enc_key = X25519PrivateKey.generate()
        st.mask_key, st.mask_key_value = crypto.new_private_key()
        st.stage = Stage.ADVERTISE_KEYS
        return AdvertiseKeys(st.client_id, crypto.public_bytes(st.enc_key), crypto.public_bytes(st.mask_key))

    def share_keys(self, msg: KeysBroadcast) -> EncryptedShares:
        """ADVERTISE_KEYS -> SHARE_KEYS: Shamir-share b_u and s_u among neighbours and self, encrypt each share."""
        st = self.state
        expect(st.stage, Stage.ADVERTISE_KEYS, self._who, "KeysBroadcast")
        holders = sorted([st.client_id, *msg.neighbours])
        if st.client_id in msg.neighbours or len(set(holders)) != len(holders):
            raise SecAggError(f"secagg {self._who}: KeysBroadcast lists the client as its own neighbour")
        # Refuse a threshold below the configured one: a low t would let a few colluders rebuild our secrets.
        if not self.config.threshold_of(len(holders)) <= msg.threshold <= len(holders):
            raise SecAggError(f"secagg {self._who}: KeysBroadcast asks for threshold {msg.threshold} with "
                              f"{len(holders)} share holders; secagg.threshold allows "
                              f"{self.config.threshold_of(len(holders))}..{len(holders)} (stage ADVERTISE_KEYS)")
        keys = [k for pair in msg.neighbours.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"secagg {self._who}: KeysBroadcast repeats a public key (stage ADVERTISE_KEYS)")
        st.round_id, st.threshold, st.bits, st.dim = msg.round_id, msg.threshold, msg.bits, msg.dim
        st.neighbours = dict(msg.neighbours)
        st.self_seed = _csprng.randbelow(shamir.PRIME)
        shares = shamir.split([st.self_seed, st.mask_key_value], [h + 1 for h in holders], st.threshold)
        out = {}
        for holder, (b_share, s_share) in zip(holders, shares):
            if holder == st.client_id:
                st.held_shares[holder] = (int(b_share), int(s_share))  # our own share never leaves
                continue
            key = crypto.agree(st.enc_key, st.neighbours[holder][0], pair_info(b"enc", st.round_id, st.client_id,
                                                                                 holder))
            st.share_keys[holder] = key  # the same key decrypts what this holder sends us back
            plain = shamir.to_bytes(b_share) + shamir.to_bytes(s_share)
            out[holder] = crypto.encrypt(key, plain, share_aad(st.round_id, st.client_id, holder))
        st.stage = Stage.SHARE_KEYS
        return EncryptedShares(st.client_id, out)

    def receive_shares(self, msg: SharesForward) -> None:
        """SHARE_KEYS -> COLLECT_MASKED: decrypt the shares addressed to us; their senders are our mask partners."""
        st = self.state
        expect(st.stage, Stage.SHARE_KEYS, self._who, "SharesForward")
        for sender, ciphertext in msg.ciphertexts.items():
            if sender not in st.neighbours:
                raise SecAggError(f"secagg {self._who}: a share from client {sender}, not a neighbour "
                                  "(stage SHARE_KEYS)")
            try:
                plain = crypto.decrypt(st.share_keys[sender], ciphertext, share_aad(st.round_id, sender, st.client_id))
            except crypto.DecryptionError as err:
                raise SecAggError(f"secagg {self._who}: the share from client {sender} does not decrypt "
                                  "(stage SHARE_KEYS)") from err
            if len(plain) != 2 * shamir.ELEMENT_BYTES:
                raise SecAggError(f"secagg {self._who}: the share from client {sender} has {len(plain)} bytes")
            st.held_shares[sender] = (shamir.from_bytes(plain[:32]), shamir.from_bytes(plain[32:]))
        if len(msg.ciphertexts) + 1 < st.threshold:
            raise SecAggError(f"secagg {self._who}: only {len(msg.ciphertexts)} neighbours shared keys, fewer than "
                              f"threshold {st.threshold} - 1 (stage SHARE_KEYS)")
        st.partners = tuple(sorted(msg.ciphertexts))
        st.stage = Stage.COLLECT_MASKED

    def masked_input(self, delta: torch.Tensor, weight: int) -> MaskedInput:
        """COLLECT_MASKED -> UNMASK: y_u = encode(weight * delta, weight) + PRG(b_u) + sum_v ±PRG(s_uv)."""
        st = self.state
        expect(st.stage, Stage.COLLECT_MASKED, self._who, "masked input")
        if delta.numel() + 1 != st.dim:
            raise SecAggError(f"secagg {self._who}: update has {delta.numel()} values, the round expects "
                              f"{st.dim - 1} (stage COLLECT_MASKED)")
        if not 1 <= weight <= self.config.max_weight or int(weight) != weight:
            raise SecAggError(f"secagg {self._who}: weight {weight} must be an integer in [1, secagg.max_weight = "
                              f"{self.config.max_weight}] (stage COLLECT_MASKED)")
        y = fixedpoint.encode(delta, int(weight), clip=self.config.clip, scale=self.config.scale, bits=st.bits)
        masks = [(shamir.to_bytes(st.self_seed), 1)]  # b_u: 255 random bits keying the PRG
        for peer in st.partners:
            seed = crypto.agree(st.mask_key, st.neighbours[peer][1], pair_info(b"mask", st.round_id, st.client_id,
                                                                                 peer))
            masks.append((seed, pair_sign(st.client_id, peer)))
        crypto.add_masks_(y, masks, st.bits)
        st.stage = Stage.UNMASK
        return MaskedInput(st.client_id, st.bits, y)

    def respond(self, msg: KeysBroadcast | SharesForward | UnmaskRequest | None
                ) -> AdvertiseKeys | EncryptedShares | UnmaskShares | None:
        """One step for a network transport: the server's message in, this client's reply out (None: nothing to
        send). `None` in is the server's call to advertise keys; the masked input goes via `masked_input`."""
        if msg is None:
            return self.advertise()
        if isinstance(msg, KeysBroadcast):
            return self.share_keys(msg)
        if isinstance(msg, SharesForward):
            self.receive_shares(msg)
            return None
        if isinstance(msg, UnmaskRequest):
            return self.unmask(msg)
        raise SecAggError(f"secagg {self._who}: a {type(msg).__name__} is not a message from the server "
                          f"(stage {self.state.stage.name})")

    def unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        """UNMASK -> DONE: for each partner (and self) the share of b if it survived, else of s; never both."""
        st = self.state
        expect(st.stage, Stage.UNMASK, self._who, "UnmaskRequest")
        survivors = set(msg.survivors)
        if st.client_id not in survivors:
            raise SecAggError(f"secagg {self._who}: UnmaskRequest does not list this client as a survivor")
        if not survivors <= set(st.partners) | {st.client_id}:
            raise SecAggError(f"secagg {self._who}: UnmaskRequest lists as survivors clients that are not "
                              f"partners of this one: {sorted(survivors - set(st.partners) - {st.client_id})} "
                              "(stage UNMASK)")
        if len(survivors) < st.threshold:  # fewer would let the server learn neighbours' keys cheaply
            raise SecAggError(f"secagg {self._who}: {len(survivors)} surviving share holders < threshold "
                              f"{st.threshold} (stage UNMASK)")
        self_mask, keys = {}, {}
        for owner in (st.client_id, *st.partners):
            b_share, s_share = st.held_shares[owner]
            if owner in survivors:
                self_mask[owner] = b_share
            else:
                keys[owner] = s_share
        st.stage = Stage.DONE
        st.held_shares.clear()
        st.share_keys.clear()
        return UnmaskShares(st.client_id, self_mask, keys)

