"""Simulated attackers for robustness experiments (`[fl.attack]`): a fixed, seeded set of clients misbehaves.

- sign_flip: sends −scale·Δ instead of its honest delta Δ (with scale 4, 20% attackers cancel the honest 80%).
- scaled_noise: sends Gaussian noise whose per-coordinate std is `scale` times its honest delta's RMS.
- label_flip: trains honestly on poisoned labels y → num_classes − 1 − y.
- huge_update: sends finite but huge values (±3e38, the sign of its honest delta): one such update turns an
  unchecked mean into Inf.
- huge_count: sends −scale·Δ and claims 2^62 examples, so that it would own an unchecked weighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from plait.federated.seeds import ATTACKERS, stream


@dataclass(kw_only=True, slots=True)
class AttackConfig:
    kind: Literal["none", "sign_flip", "scaled_noise", "label_flip", "huge_update", "huge_count"] = "none"
    fraction: float = 0.2      # share of all clients that are attackers
    scale: float = 4.0         # sign_flip, huge_count: multiplier of the flipped delta; scaled_noise: std / RMS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"attack.fraction must be in [0, 1], got {self.fraction}")
        if self.scale <= 0:
            raise ValueError(f"attack.scale must be > 0, got {self.scale}")


def attacker_ids(config: AttackConfig, num_clients: int) -> frozenset[int]:
    if config.kind == "none":
        return frozenset()
    count = math.floor(config.fraction * num_clients + 1e-9)
    order = stream(config.seed, ATTACKERS).permutation(num_clients)
    return frozenset(int(cid) for cid in order[:count])


HUGE_VALUE = 3e38       # finite in float32 (max 3.4e38); the sum of two overflows to Inf
HUGE_COUNT = 2 ** 62


def poison_delta(kind: str, delta: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    if kind in ("sign_flip", "huge_count"):
        return -scale * delta
    if kind == "huge_update":
        return torch.where(delta < 0, -HUGE_VALUE, HUGE_VALUE).to(delta.dtype)
    if kind == "scaled_noise":
        rms = delta.square().mean().sqrt()
        return torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (scale * rms)
    return delta  # label_flip poisons the data, not the update


def poison_count(kind: str, num_examples: int) -> int:
    """The number of examples an attacker claims for its update."""
    return HUGE_COUNT if kind == "huge_count" else num_examples


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return num_classes - 1 - y
