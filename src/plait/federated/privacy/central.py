"""Central user-level DP-FedAvg (McMahan et al. 2018) as a wrapper around another aggregator.

The server clips each client's delta to norm C before the inner aggregator sees it, and releases

    (sum_k clip(Δ_k) + N(0, (z_Δ·C)² I)) / expected_clients

with a fixed denominator (the expected number of clients per round), so one user's presence changes the released
value by at most C / expected_clients whatever the others sent. The inner aggregator must produce the uniform mean
of what it was given (FedAvg with uniform weighting, or a secure-aggregation sum of it).

Adaptive clipping (Andrew et al. 2021): each client also reports b_k = [||Δ_k|| <= C]; the server updates
C ← C·exp(−η_C (b̄ − γ)) with b̄ = (sum_k b_k + N(0, σ_b²)) / expected_clients. The count is released too, so the
delta noise shrinks to z_Δ = (z^-2 − (2σ_b)^-2)^(-1/2), keeping the total privacy that of multiplier z.
"""

from __future__ import annotations

import math

import torch

from plait.core.clip import clip_to_norm, gaussian_noise
from plait.federated.client_update import Update


def delta_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float | None) -> float:
    """z_Δ: the multiplier left for the deltas once the unclipped count also takes its share of the privacy."""
    if clipped_count_stddev is None or noise_multiplier == 0:
        return noise_multiplier
    share = noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2
    if share <= 0:
        raise ValueError(f"privacy.clipped_count_stddev = {clipped_count_stddev} is too small for "
                         f"noise_multiplier = {noise_multiplier}: need 2·σ_b > z")
    return share ** -0.5


def update_clip_norm(clip_norm: float, unclipped: float, expected_clients: int, target_quantile: float,
                     clip_lr: float, count_noise: float) -> float:
    """Andrew et al.'s geometric update from the (noised) number of unclipped updates."""
    fraction = (unclipped + count_noise) / expected_clients
    return clip_norm * math.exp(-clip_lr * (fraction - target_quantile))


class CentralDPAggregator:
    """Clip → inner aggregate → fixed-denominator Gaussian noise. One object per round."""

    def __init__(self, inner, clip_norm: float, noise_multiplier: float, expected_clients: int,
                 generator: torch.Generator, clipped_count_stddev: float | None = None):
        if expected_clients < 1:
            raise ValueError(f"privacy.expected_clients must be >= 1, got {expected_clients}")
        self.inner, self.clip_norm, self.expected_clients = inner, clip_norm, expected_clients
        self.noise_multiplier = delta_noise_multiplier(noise_multiplier, clipped_count_stddev)
        self.clipped_count_stddev = clipped_count_stddev
        self.generator = generator
        self.count = 0
        self._unclipped = torch.zeros(())

    def begin(self, selected: list[int]) -> None:
        if hasattr(self.inner, "begin"):
            self.inner.begin(selected)

    def add(self, client_id: int, update: Update) -> None:
        clipped, norm = clip_to_norm(update.delta, self.clip_norm)
        self._unclipped += (norm <= self.clip_norm).float()
        self.inner.add(client_id, Update(clipped, update.num_examples, update.metrics))
        self.count += 1

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("central DP: no client updates to aggregate")
        total = self.inner.result() * self.count  # the inner uniform mean back to a sum
        noise = gaussian_noise(total.shape, self.noise_multiplier * self.clip_norm, self.generator,
                               total.dtype, total.device)
        return (total + noise) / self.expected_clients

    @property
    def unclipped_fraction(self) -> float:
        return float(self._unclipped) / max(self.count, 1)

    def next_clip_norm(self, target_quantile: float, clip_lr: float) -> float:
        """The clip norm for the next round (adaptive clipping); draws the count noise from the same generator."""
        std = self.clipped_count_stddev or 0.0
        count_noise = float(gaussian_noise((), std, self.generator)) if std else 0.0
        return update_clip_norm(self.clip_norm, float(self._unclipped), self.expected_clients, target_quantile,
                                clip_lr, count_noise)
