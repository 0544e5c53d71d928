"""The cryptographic pieces of secure aggregation, all from `cryptography` (nothing hand-rolled):

- X25519 key agreement, with HKDF-SHA256 turning each shared secret into a purpose-bound 32-byte key;
- AES-256-GCM for the Shamir shares sent client to client through the server;
- AES-256-CTR keystream as the PRG that expands a 32-byte seed into a mask vector over Z_{2^bits}.

Key material comes from the OS CSPRNG, never from the run's seed: a seeded key would let anyone who knows the
config remove the masks. Results stay reproducible anyway, since the masks cancel exactly.
"""

from __future__ import annotations

import os

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plait.federated.secagg import shamir

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class DecryptionError(ValueError):
    """A ciphertext failed authentication: wrong key, wrong sender/recipient, or tampered bytes."""


def new_private_key() -> tuple[X25519PrivateKey, int]:
    """A fresh X25519 key whose 32 raw bytes, read as a little-endian integer, are a Shamir field element.

    The bytes are clamped as X25519 would clamp them anyway (RFC 7748), which puts them in [2^254, 2^255) and
    thus below the field prime (a value in the last 19 is rejected).
    """
    while True:
        raw = bytearray(os.urandom(KEY_BYTES))
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        value = int.from_bytes(raw, "little")
        if value < shamir.PRIME:
            return X25519PrivateKey.from_private_bytes(bytes(raw)), value


def private_key_from_int(value: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(int(value).to_bytes(KEY_BYTES, "little"))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """X25519 then HKDF-SHA256: a 32-byte key bound to `info` (purpose, round and the two client ids)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # e.g. a low-order public key, which gives an all-zero secret
        raise DecryptionError(f"key agreement failed: {err}") from err
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-GCM(plaintext) || tag. A random nonce: the same pair key serves both directions."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag as err:
        raise DecryptionError("authentication failed") from err


def element_bytes(bits: int) -> int:
    """Keystream bytes per ring element: 4 for rings up to 2^32, else 8."""
    return 4 if bits <= 32 else 8


def _keystream_words(seed: bytes, numel: int, bits: int) -> torch.Tensor:
    """`numel` words (int32 for rings up to 2^32, else int64) of the AES-256-CTR keystream keyed by `seed`.

    Each seed is used once per round (seeds are per pair and per round), so a fixed counter start is safe.
    """
    width = element_bytes(bits)
    size = numel * width
    buf = bytearray(size + 15)  # update_into wants room for one block beyond the data
    Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(bytes(size), buf)
    return torch.frombuffer(buf, dtype=torch.int32 if width == 4 else torch.int64, count=numel)


def expand(seed: bytes, numel: int, bits: int) -> torch.Tensor:
    """PRG: `numel` uniform elements of Z_{2^bits} (int64) from a 32-byte seed."""
    # The low `bits` of a uniform word are a uniform element of Z_{2^bits}.
    return _keystream_words(seed, numel, bits).to(torch.int64).bitwise_and_((1 << bits) - 1)


def add_masks_(acc: torch.Tensor, masks: list[tuple[bytes, int]], bits: int) -> torch.Tensor:
    """acc <- acc + sum(sign * PRG(seed)) mod 2^bits, in place, for (seed, sign) pairs; acc is int64 in the ring.

    For rings up to 2^32 the raw int32 words are added as they are (congruent mod 2^bits to the reduced values)
    and reduced once at the end: no int64 overflow below 2^31 masks. Wider rings reduce after every mask.
    """
    ring = (1 << bits) - 1
    for seed, sign in masks:
        words = _keystream_words(seed, acc.numel(), bits)
        if bits > 32:
            words.bitwise_and_(ring)
        acc.add_(words) if sign > 0 else acc.sub_(words)
        if bits > 32:
            acc.bitwise_and_(ring)
    return acc.bitwise_and_(ring)
