"""Shamir t-of-n sharing over GF(2^255 - 19): any t shares rebuild the secret, t - 1 do not."""

import itertools
import secrets

import pytest

from plait.federated.secagg import shamir


def test_reconstruct_against_hand_computed_polynomial():
    # f(x) = 5 + 3x + 2x^2: f(1) = 10, f(2) = 19, f(4) = 49; Lagrange at 0 gives f(0) = 5.
    assert shamir.reconstruct([1, 2, 4], [[10], [19], [49]], threshold=3) == [5]
    # Negative intermediate terms wrap mod p: f(x) = 7 - x (mod p) -> f(3) = 4, f(9) = p - 2.
    assert shamir.reconstruct([3, 9], [[4], [shamir.PRIME - 2]], threshold=2) == [7]


def test_any_t_of_n_shares_rebuild_every_secret():
    # Prepare: two secrets (one near the top of the field), 7 holders named by sparse ids, t = 4
    values = [secrets.randbelow(shamir.PRIME), shamir.PRIME - 1]
    holders = [3, 8, 11, 20, 21, 57, 1000]
    shares = shamir.split(values, holders, threshold=4)
    # Execute / Assert: all C(7, 4) = 35 subsets of size t, and a subset of size t + 2, give the secrets
    for subset in itertools.combinations(range(7), 4):
        got = shamir.reconstruct([holders[i] for i in subset], shares[list(subset)], threshold=4)
        assert got == values, subset
    assert shamir.reconstruct([holders[i] for i in (6, 0, 4, 2, 1, 5)], shares[[6, 0, 4, 2, 1, 5]], 4) == values


def test_t_minus_one_shares_fail():
    # Prepare
    value = secrets.randbelow(shamir.PRIME)
    holders = list(range(1, 8))
    shares = shamir.split([value], holders, threshold=5)
    # Execute / Assert: reconstruct refuses fewer than t shares ...
    with pytest.raises(ValueError, match="need at least 5"):
        shamir.reconstruct(holders[:4], shares[:4], threshold=5)
    # ... and interpolating t - 1 points as if t were 4 gives a wrong value, for every choice of 4 holders
    for subset in itertools.combinations(range(7), 4):
        assert shamir.reconstruct([holders[i] for i in subset], shares[list(subset)], threshold=4) != [value]


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        shamir.split([1], [1, 2], threshold=3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split([1], [1, 1, 2], threshold=2)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split([1], [0, 1], threshold=2)   # x = 0 would hand out the secret itself
    with pytest.raises(ValueError, match="secrets"):
        shamir.split([shamir.PRIME], [1, 2], threshold=2)
    with pytest.raises(ValueError, match="out of range"):
        shamir.from_bytes((2**256 - 1).to_bytes(32, "little"))
