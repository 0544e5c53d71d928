"""What an update may claim before it is aggregated, checked the same in simulation and over the network:

- finite values (a NaN/Inf update is refused: from a simulated client it means local training diverged);
- a bounded L2 norm: at most `fl.bounds.max_norm`, and at most `norm_factor` times the median norm of the updates
  accepted in recent rounds; refused (reason `norm`) or, with `clip = true`, scaled down to the bound;
- a bounded weight: `num_examples` is capped at `max_examples`, and at `examples_factor` times the median of the
  counts the round's cohort declared before training (simulation: the clients' partition sizes; network: what each
  client declared when it registered, which its reports may not exceed). Each capped weight is counted.

An update of finite but huge values (3e38) would otherwise turn the global model to Inf and stop the federation;
a client claiming 2^62 examples would own the weighted mean, and with only the absolute cap (10^7) one claiming
10^7 against clients of 600 still would. Both medians come from what is known before the round's updates arrive
(norms of previous rounds, the cohort's declarations), so a round's outcome does not depend on their order.
Masked (secure-aggregation) updates cannot be read by the server and are not checked here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from plait.core.finite import all_finite
from plait.federated.client_update import Update
from plait.runtime.divergence import Diverged as Diverged  # re-exported: fl.bounds.on_divergence = "stop" raises it


@dataclass(kw_only=True, slots=True)
class BoundsConfig:
    max_norm: float = 1e6            # refuse updates with an L2 norm above this (0: no absolute bound)
    norm_factor: float = 100.0       # ... or above this multiple of the recent median norm (0: off)
    clip: bool = False               # scale an update down to the bound instead of refusing it
    max_examples: int = 10_000_000   # cap on the weight (num_examples) one client can claim (0: no cap)
    examples_factor: float = 2.0     # ... and relative to the cohort: this multiple of the median count the round's
                                     # clients declared (0: off). Liars making up a share a of the cohort cancel the
                                     # honest rest from a factor of 1/a - 1 on (4 at 20%)
    on_divergence: Literal["stop", "skip"] = "stop"  # a non-finite update, aggregate, model or loss: stop the run
                                                     # (exit 1, last good checkpoint kept) or skip the round

    def __post_init__(self) -> None:
        if self.max_norm < 0 or self.norm_factor < 0 or self.max_examples < 0 or self.examples_factor < 0:
            raise ValueError("fl.bounds.max_norm, norm_factor, max_examples and examples_factor must be >= 0")
        if self.norm_factor and self.norm_factor < 1:
            raise ValueError(f"fl.bounds.norm_factor must be >= 1 (a multiple of the median), got {self.norm_factor}")
        if self.examples_factor and self.examples_factor < 1:
            raise ValueError("fl.bounds.examples_factor must be >= 1 (a multiple of the median count) or 0 (off), "
                             f"got {self.examples_factor}")


class UpdateRefused(ValueError):
    """An update failed a bound; `reason` is its counter's name (nonfinite, norm)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


HISTORY = 100  # accepted update norms kept for the relative bound (in the server state: checkpointed)


def median_norm(history: torch.Tensor) -> float | None:
    if history.numel() < 5:  # too few to say what is normal: the relative bound waits
        return None
    return float(history.sort().values[history.numel() // 2])


def extend_history(history: torch.Tensor, norms: list[float]) -> torch.Tensor:
    return torch.cat([history, torch.tensor(norms, dtype=torch.float64)])[-HISTORY:]


def examples_cap(config: BoundsConfig, declared: Mapping[int, int]) -> float:
    """The most examples one client's update may weigh this round: `max_examples`, and `examples_factor` times the
    cohort's median declared count (the lower median: attackers declaring huge counts move it only if they are at
    least half the cohort). At least 1, so that an honest round always has weight."""
    caps = [float(config.max_examples)] if config.max_examples else []
    if config.examples_factor and declared:
        counts = sorted(declared.values())
        caps.append(max(1.0, math.floor(config.examples_factor * counts[(len(counts) - 1) // 2])))
    return min(caps) if caps else math.inf


class BoundedAggregator:
    """Checks each update, then hands it to `inner` (the strategy, wrapped by central DP when on). `declared`: the
    number of examples each client of the round's cohort declared before training (empty: no relative cap)."""

    def __init__(self, inner: Any, config: BoundsConfig, history: torch.Tensor,
                 declared: Mapping[int, int] | None = None):
        self.inner, self.config = inner, config
        median = median_norm(history)
        bounds = [b for b in (config.max_norm, config.norm_factor * median if config.norm_factor and median else 0)
                  if b > 0]
        self.bound = min(bounds) if bounds else math.inf
        self.max_weight = examples_cap(config, declared or {})
        self.accepted_norms: list[float] = []
        self.capped = {"examples": 0, "norm": 0}  # weights capped, norms clipped: the round's record counts them

    def add(self, client_id: int, update: Update) -> None:
        delta = update.delta
        if not all_finite(delta):
            raise UpdateRefused("nonfinite", f"client {client_id}: its update holds NaN or Inf values")
        norm = float(delta.norm())
        if norm > self.bound:
            if not self.config.clip:
                raise UpdateRefused("norm", f"client {client_id}: update norm {norm:.4g} is above the bound "
                                            f"{self.bound:.4g} (fl.bounds)")
            delta = delta * (self.bound / norm)
            self.capped["norm"] += 1
        examples = update.num_examples
        if examples > self.max_weight:
            examples = int(self.max_weight)
            self.capped["examples"] += 1
        self.accepted_norms.append(min(norm, self.bound))
        self.inner.add(client_id, Update(delta, examples, update.metrics, update.local_buffers))

    def result(self) -> torch.Tensor:
        result: torch.Tensor = self.inner.result()
        return result
