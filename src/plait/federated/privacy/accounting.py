"""Privacy accounting with dp-accounting's RDP accountant.

Central DP-FedAvg: each round is a sampled Gaussian mechanism, clients sampled with probability q (the round's
expected clients / all clients; the server samples a fixed number without replacement, which McMahan et al. 2018
account as Poisson sampling with the same q), noise multiplier z, add-or-remove-one-user adjacency.
Local DP: a user's whole update may change, so the sensitivity is 2C and the effective multiplier z/2; no
amplification by sampling is claimed (the server knows who took part), and every round is counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

# Integer orders only: dp-accounting's fractional orders near 1 fail to converge for small q and log warnings.
ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256, 512, 1024)


def _event(noise_multiplier: float, sample_rate: float):
    import dp_accounting  # imported on first use: it costs seconds at start-up in every process

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """ε at `delta` after `rounds` sampled Gaussian rounds (inf without noise, 0 before any round)."""
    if rounds < 0 or not 0 < sample_rate <= 1:
        raise ValueError(f"privacy accounting: rounds must be >= 0 and sample_rate in (0, 1], got {rounds}, "
                         f"{sample_rate}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(ORDERS)
    accountant.compose(_event(noise_multiplier, sample_rate), rounds)
    return float(accountant.get_epsilon(delta))


def epsilon_of_rates(rates: Sequence[float], noise_multiplier: float, delta: float) -> float:
    """ε at `delta` after one sampled Gaussian round per entry of `rates` (each round's own sampling rate q):
    the rounds compose in RDP whatever their q, so a federation whose connected clients change is accounted at
    the rate it really sampled, round by round."""
    if not rates:
        return 0.0
    if any(not 0 < q <= 1 for q in rates):
        raise ValueError(f"privacy accounting: every sampling rate must be in (0, 1], got {sorted(set(rates))}")
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(ORDERS)
    for q, count in sorted(Counter(round(float(q), 12) for q in rates).items()):
        accountant.compose(_event(noise_multiplier, q), count)
    return float(accountant.get_epsilon(delta))


def rounds_within_budget(budget: float, noise_multiplier: float, sample_rate: float, delta: float,
                         max_rounds: int) -> int:
    """The most rounds (<= max_rounds) whose ε stays within `budget` (binary search: ε grows with rounds)."""
    lo, hi = 0, max_rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, delta) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
