"""The training plan broadcast with the global weights: what a client runs locally this round."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingPlan:
    epochs: int = 1            # E: passes over the client's local data
    batch_size: int = 10       # B: 0 means the whole local data set as one batch (FedSGD when epochs=1)
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0       # FedProx proximal term mu/2 ||w - w_global||^2; 0 is plain FedAvg
    max_steps: int = 0         # cap on local steps (0: no cap), e.g. to bound heterogeneous clients' work
    seed: int = 0              # per-client, per-round seed for local shuffling

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"plan.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 0:
            raise ValueError(f"plan.batch_size must be >= 0 (0 = full batch), got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"plan.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"plan.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.prox_mu < 0 or self.max_steps < 0:
            raise ValueError("plan.weight_decay, plan.prox_mu and plan.max_steps must be >= 0")

    def for_client(self, seed: int) -> TrainingPlan:
        """A new plan object for one client (plans are immutable; no client shares a mutable instruction)."""
        return replace(self, seed=seed)

    def num_steps(self, num_examples: int) -> int:
        batch = num_examples if self.batch_size == 0 else self.batch_size
        steps = self.epochs * -(-num_examples // max(batch, 1))
        return min(steps, self.max_steps) if self.max_steps else steps
