"""What both halves of the protocol agree on: the stages, the error type, and how keys are bound to their use.

One round (Bonawitz et al. 2017, semi-honest variant; both halves are state machines over these stages):

    SETUP           server fixes the round (expected clients, ring width); each client makes two X25519 key pairs
    ADVERTISE_KEYS  clients send their public keys; the server sends each client its neighbours' keys (U1)
    SHARE_KEYS      each client Shamir-shares its self-mask seed b_u and mask private key s_u among its neighbours
                    and itself (t-of-(k+1)), each share AES-GCM-encrypted for its holder; the server routes (U2)
    COLLECT_MASKED  clients send y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^bits; the server sums them (U3)
    UNMASK          survivors send, per neighbour, the share of b_v if v is in U3, else the share of s_v (never
                    both); the server rebuilds the seeds, removes self-masks and the dropped clients' pair masks
    DONE            the server holds only the sum over U3
"""

from __future__ import annotations

import enum
import struct


class Stage(enum.Enum):
    SETUP = "setup"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "collect_masked"
    UNMASK = "unmask"
    DONE = "done"


class SecAggError(RuntimeError):
    """The round cannot go on (too many dropouts, a message out of order, a bad share); names stage and client."""


def expect(actual: Stage, wanted: Stage, who: str, what: str) -> None:
    if actual is not wanted:
        raise SecAggError(f"secagg {who}: {what} in stage {actual.name}, expected stage {wanted.name}")


def pair_info(purpose: bytes, round_id: int, a: int, b: int) -> bytes:
    """HKDF info binding a pair key to its purpose, the round and the (unordered) pair of clients."""
    lo, hi = sorted((a, b))
    return b"plait-secagg/" + purpose + struct.pack("<QII", round_id, lo, hi)


def share_aad(round_id: int, sender: int, recipient: int) -> bytes:
    """Associated data of a share ciphertext: a share is only valid from this sender, to this recipient, now."""
    return b"plait-secagg/share" + struct.pack("<QII", round_id, sender, recipient)


def pair_sign(owner: int, peer: int) -> int:
    """Client `owner` adds +PRG(s_uv) for peers above it and -PRG(s_uv) for peers below, so each pair cancels."""
    return 1 if owner < peer else -1
