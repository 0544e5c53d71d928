"""`[fl.privacy]`: which DP mechanism a run uses, and its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class PrivacyConfig:
    mode: Literal["none", "central", "local"] = "none"
    clip_norm: float = 1.0             # C: each client's delta is clipped to this L2 norm (the start value if adaptive)
    noise_multiplier: float = 1.0      # z: Gaussian noise std is z·C (central: on the sum; local: on each update)
    delta: float = 1e-5                # δ at which ε is reported
    epsilon_budget: float = 0.0        # stop training before a round would spend more than this ε (0: no budget)
    expected_clients: int = 0          # central: the fixed denominator q·W (0: the round's target client count)
    adaptive: bool = False             # central: quantile-based adaptive clipping (Andrew et al. 2021)
    target_quantile: float = 0.5       # adaptive: γ, the share of updates that should be left unclipped
    clip_lr: float = 0.2               # adaptive: η_C in C ← C·exp(−η_C (b̄ − γ))
    clipped_count_stddev: float = 0.0  # adaptive: σ_b, noise on the unclipped count (0: expected_clients / 20)
    seeded_noise: bool = False         # reproducible noise from run.seed, for experiments only: anyone holding the
                                       # config can regenerate and remove it (default: OS entropy)

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget < 0:
            raise ValueError(f"privacy.epsilon_budget must be >= 0 (0: no budget), got {self.epsilon_budget}")
        if self.epsilon_budget and self.noise_multiplier == 0:
            raise ValueError("privacy.epsilon_budget needs privacy.noise_multiplier > 0 (without noise ε is infinite)")
        if self.expected_clients < 0:
            raise ValueError(f"privacy.expected_clients must be >= 0, got {self.expected_clients}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.clip_lr <= 0 or self.clipped_count_stddev < 0:
            raise ValueError("privacy.clip_lr must be > 0 and privacy.clipped_count_stddev >= 0")
        if self.mode != "central" and (self.adaptive or self.expected_clients):
            raise ValueError("privacy.adaptive and privacy.expected_clients apply to mode = 'central' only")
