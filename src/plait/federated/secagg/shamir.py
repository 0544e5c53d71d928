"""Shamir t-of-n secret sharing over the prime field GF(2^255 - 19).

A secret s is the constant term of a random polynomial f of degree t - 1; holder x gets f(x). Any t points fix f
and so f(0) = s (Lagrange interpolation); t - 1 points are consistent with every secret, so they reveal nothing.
Holders are named by positive integers (the protocol uses client_id + 1). Python ints in numpy object arrays keep
the maths exact and vectorised over holders and secrets; coefficients come from the OS CSPRNG (`secrets`),
never from a seeded generator, since a predictable polynomial would reveal the secret.
"""

from __future__ import annotations

import secrets as _csprng
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

PRIME = 2**255 - 19          # a well-known prime; every 32-byte value below it is a field element
ELEMENT_BYTES = 32


def split(secret_values: Sequence[int], holders: Sequence[int], threshold: int) -> np.ndarray:
    """Shares of each secret for each holder: an object array [len(holders), len(secret_values)] of ints < PRIME."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"shamir: threshold {threshold} must be in [1, {len(holders)}] (the number of holders)")
    if len(set(holders)) != len(holders) or min(holders) <= 0 or max(holders) >= PRIME:
        raise ValueError("shamir: holders must be distinct integers in [1, PRIME)")
    if any(not 0 <= s < PRIME for s in secret_values):
        raise ValueError("shamir: secrets must be integers in [0, PRIME)")
    num_secrets = len(secret_values)
    # coeffs[j, s]: coefficient of x^j in the polynomial of secret s; row 0 holds the secrets.
    coeffs = np.empty((threshold, num_secrets), dtype=object)
    coeffs[0] = list(secret_values)
    for j in range(1, threshold):
        coeffs[j] = [_csprng.randbelow(PRIME) for _ in range(num_secrets)]
    xs = np.array(list(holders), dtype=object)[:, None]
    # Horner's rule over all holders and secrets at once: acc <- acc * x + c_j.
    acc = np.empty((len(holders), num_secrets), dtype=object)
    acc[:] = coeffs[threshold - 1]
    for j in range(threshold - 2, -1, -1):
        acc = (acc * xs + coeffs[j]) % PRIME
    return acc


def reconstruct(holders: Sequence[int], shares: np.ndarray | Sequence[Sequence[int]], threshold: int) -> list[int]:
    """The secrets from the shares of `holders` (rows of `shares`); needs at least `threshold` holders.

    Uses exactly the first `threshold` shares, so any t shares give the same answer as any other t.
    """
    if len(holders) < threshold:
        raise ValueError(f"shamir: {len(holders)} shares cannot rebuild a {threshold}-of-n secret "
                         f"(need at least {threshold})")
    if len(shares) != len(holders):
        raise ValueError(f"shamir: {len(shares)} share rows for {len(holders)} holders")
    xs = tuple(int(x) for x in holders[:threshold])
    if len(set(xs)) != threshold:
        raise ValueError("shamir: the same holder appears twice among the shares")
    weights = np.array(lagrange_at_zero(xs), dtype=object)
    rows = np.array([list(row) for row in shares[:threshold]], dtype=object)
    return [int(v) for v in (weights @ rows) % PRIME]


@lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis weights l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod PRIME (cached: the server rebuilds many
    secrets from the same set of survivors)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def to_bytes(value: int) -> bytes:
    return int(value).to_bytes(ELEMENT_BYTES, "little")


def from_bytes(data: bytes) -> int:
    value = int.from_bytes(data, "little")
    if value >= PRIME:
        raise ValueError("shamir: field element out of range")
    return value
