"""The messages of one secure-aggregation round, as plain dataclasses of ints, bytes and tensors.

Client and server halves exchange only these, so the same objects run in-process and over a network. `encode`
/ `decode` give their byte form: a 4-byte header (b"SA", version, type), then fixed little-endian fields and raw
bytes, never pickle. Masked vectors travel bit-packed at the ring's width. `wire_size` is the encoded length,
computed without encoding (the in-process simulation counts traffic with it; a test checks they agree).

    client -> server: AdvertiseKeys, EncryptedShares, MaskedInput, UnmaskShares
    server -> client: KeysBroadcast, SharesForward, UnmaskRequest
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from plait.federated.secagg import fixedpoint, shamir

MAGIC, VERSION = b"SA", 1
_HEADER = 4
KEY = 32  # X25519 public key bytes
SHARE = shamir.ELEMENT_BYTES


@dataclass(frozen=True, slots=True)
class AdvertiseKeys:
    client_id: int
    enc_key: bytes    # X25519 public key for encrypting shares
    mask_key: bytes   # X25519 public key for pairwise masks

    def wire_size(self) -> int:
        return _HEADER + 4 + 2 * KEY


@dataclass(frozen=True, slots=True)
class KeysBroadcast:
    round_id: int
    threshold: int    # t: shares needed to rebuild a secret
    bits: int         # ring Z_{2^bits}
    dim: int          # elements of each masked vector (update length + 1 for the weight)
    neighbours: dict[int, tuple[bytes, bytes]]  # neighbour id -> (enc_key, mask_key)

    def wire_size(self) -> int:
        return _HEADER + 8 + 4 + 1 + 4 + 4 + len(self.neighbours) * (4 + 2 * KEY)


@dataclass(frozen=True, slots=True)
class EncryptedShares:
    client_id: int
    ciphertexts: dict[int, bytes]  # recipient id -> AES-GCM(shares of self-mask seed and mask key)

    def wire_size(self) -> int:
        return _HEADER + 8 + sum(6 + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True, slots=True)
class SharesForward:
    ciphertexts: dict[int, bytes]  # sender id -> ciphertext addressed to the receiving client

    def wire_size(self) -> int:
        return _HEADER + 4 + sum(6 + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True, slots=True)
class MaskedInput:
    client_id: int
    bits: int
    masked: torch.Tensor  # int64 [dim], elements of Z_{2^bits}

    def wire_size(self) -> int:
        return _HEADER + 4 + 1 + 4 + fixedpoint.packed_size(self.masked.numel(), self.bits)


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    survivors: tuple[int, ...]  # clients whose masked input the server holds

    def wire_size(self) -> int:
        return _HEADER + 4 + 4 * len(self.survivors)


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    client_id: int
    self_mask_shares: dict[int, int]  # survivor id -> share of its self-mask seed
    key_shares: dict[int, int]        # dropped id -> share of its mask private key

    def wire_size(self) -> int:
        return _HEADER + 12 + (4 + SHARE) * (len(self.self_mask_shares) + len(self.key_shares))


Message = (AdvertiseKeys | KeysBroadcast | EncryptedShares | SharesForward | MaskedInput | UnmaskRequest
           | UnmaskShares)
_TYPES: tuple[type, ...] = (AdvertiseKeys, KeysBroadcast, EncryptedShares, SharesForward, MaskedInput,
                            UnmaskRequest, UnmaskShares)


def encode(msg: Message) -> bytes:
    out = bytearray(MAGIC + bytes([VERSION, _TYPES.index(type(msg)) + 1]))
    if isinstance(msg, AdvertiseKeys):
        out += struct.pack("<I", msg.client_id) + _key(msg.enc_key) + _key(msg.mask_key)
    elif isinstance(msg, KeysBroadcast):
        out += struct.pack("<QIBII", msg.round_id, msg.threshold, msg.bits, msg.dim, len(msg.neighbours))
        for cid, (enc, mask) in msg.neighbours.items():
            out += struct.pack("<I", cid) + _key(enc) + _key(mask)
    elif isinstance(msg, EncryptedShares):
        out += struct.pack("<I", msg.client_id) + _blobs(msg.ciphertexts)
    elif isinstance(msg, SharesForward):
        out += _blobs(msg.ciphertexts)
    elif isinstance(msg, MaskedInput):
        out += struct.pack("<IBI", msg.client_id, msg.bits, msg.masked.numel())
        out += fixedpoint.pack(msg.masked, msg.bits)
    elif isinstance(msg, UnmaskRequest):
        out += struct.pack(f"<I{len(msg.survivors)}I", len(msg.survivors), *msg.survivors)
    elif isinstance(msg, UnmaskShares):
        out += struct.pack("<I", msg.client_id) + _shares(msg.self_mask_shares) + _shares(msg.key_shares)
    else:
        raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")
    return bytes(out)


def decode(data: bytes) -> Message:
    if len(data) < _HEADER or data[:2] != MAGIC or data[2] != VERSION or not 1 <= data[3] <= len(_TYPES):
        raise ValueError("secagg: not a secure-aggregation message (bad header)")
    kind, r = _TYPES[data[3] - 1], _Reader(data, _HEADER)
    if kind is AdvertiseKeys:
        msg: Message = AdvertiseKeys(r.u32(), r.raw(KEY), r.raw(KEY))
    elif kind is KeysBroadcast:
        round_id, threshold, bits, dim, count = r.unpack("<QIBII")
        msg = KeysBroadcast(round_id, threshold, bits, dim, {r.u32(): (r.raw(KEY), r.raw(KEY)) for _ in range(count)})
    elif kind is EncryptedShares:
        msg = EncryptedShares(r.u32(), r.blobs())
    elif kind is SharesForward:
        msg = SharesForward(r.blobs())
    elif kind is MaskedInput:
        cid, bits, numel = r.unpack("<IBI")
        if not 1 <= bits <= 62:
            raise ValueError(f"secagg: MaskedInput from client {cid} has ring width {bits} bits")
        msg = MaskedInput(cid, bits, fixedpoint.unpack(r.raw(fixedpoint.packed_size(numel, bits)), numel, bits))
    elif kind is UnmaskRequest:
        msg = UnmaskRequest(tuple(r.u32() for _ in range(r.u32())))
    else:
        msg = UnmaskShares(r.u32(), r.shares(), r.shares())
    if r.pos != len(data):
        raise ValueError(f"secagg: {len(data) - r.pos} trailing bytes after a {kind.__name__} message")
    return msg


def _key(key: bytes) -> bytes:
    if len(key) != KEY:
        raise ValueError(f"secagg: public keys are {KEY} bytes, got {len(key)}")
    return key


def _blobs(blobs: dict[int, bytes]) -> bytes:
    return struct.pack("<I", len(blobs)) + b"".join(struct.pack("<IH", k, len(v)) + v for k, v in blobs.items())


def _shares(shares: dict[int, int]) -> bytes:
    return struct.pack("<I", len(shares)) + b"".join(struct.pack("<I", k) + shamir.to_bytes(v)
                                                     for k, v in shares.items())


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def raw(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("secagg: truncated message")
        self.pos += size
        return bytes(self.data[self.pos - size : self.pos])

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.raw(struct.calcsize(fmt)))

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def blobs(self) -> dict[int, bytes]:
        out = {}
        for _ in range(self.u32()):
            key, size = self.unpack("<IH")
            out[key] = self.raw(size)
        return out

    def shares(self) -> dict[int, int]:
        return {self.u32(): shamir.from_bytes(self.raw(SHARE)) for _ in range(self.u32())}
