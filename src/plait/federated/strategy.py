"""Aggregation strategies: fold client updates in as they arrive, produce the aggregated delta.

FedAvg weights client k by n_k (or uniformly) and keeps a running sum, so the server never holds all updates.
The robust rules (median, trimmed mean, Krum, Multi-Krum) need every update at once: they stack the round's
deltas into `[num_clients, dim]` and call the pure functions of `plait.core.robust`, weighing clients equally.

An aggregator has `add(client_id, update)` and `result()`, and optionally `begin(selected_ids)`, which the server
calls once a round's clients are selected (secure aggregation uses it to set up its protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

from plait.core import robust
from plait.core.aggregate import RunningWeightedSum
from plait.federated.client_update import Update
from plait.federated.secagg.config import SecAggConfig  # plain config: imports no cryptography


@dataclass(kw_only=True, slots=True)
class StrategyConfig:
    name: Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "secagg"] = "fedavg"
    weighting: Literal["examples", "uniform"] = "examples"   # fedavg only; robust rules weigh clients equally
    trim_fraction: float = 0.2        # trimmed_mean: share of updates dropped at each end, per coordinate
    byzantine_fraction: float = 0.2   # krum, multi_krum: f = floor(this · round's clients) assumed Byzantine
    num_selected: int = 0             # multi_krum: m updates averaged (0: n − f)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)  # name = "secagg": FedAvg under secure aggregation
    INSTEAD: ClassVar[dict[tuple[str, object], str]] = {
        ("name", "fedprox"): "FedAvg with a proximal term, fl.plan.prox_mu = 0.01 (say)",
        **{("name", f"fed{opt}"): f"FedAvg with a server optimizer, fl.server_opt.name = '{opt}'"
           for opt in ("adam", "yogi", "adagrad")},
        ("name", "fedsgd"): "FedAvg with full-batch steps, fl.plan.batch_size = 0 and fl.plan.epochs = 1"}

    def __post_init__(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"strategy.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0 <= self.byzantine_fraction < 0.5:
            raise ValueError(f"strategy.byzantine_fraction must be in [0, 0.5), got {self.byzantine_fraction}")
        if self.num_selected < 0:
            raise ValueError(f"strategy.num_selected must be >= 0 (0: n − f), got {self.num_selected}")


class TooFewUpdates(ValueError):
    """A round brought fewer updates than the rule needs: the round is skipped, the run goes on."""


class Aggregator(Protocol):
    def add(self, client_id: int, update: Update) -> None: ...
    def result(self) -> torch.Tensor: ...


class FedAvgAggregator:
    def __init__(self, dim: int, weighting: str = "examples"):
        self._sum = RunningWeightedSum(dim)
        self._weighting = weighting

    def add(self, client_id: int, update: Update) -> None:
        self._sum.add(update.delta, update.num_examples if self._weighting == "examples" else 1.0)

    def result(self) -> torch.Tensor:
        return self._sum.mean()


class RobustAggregator:
    """Collects the round's deltas, then applies a robust rule to the stacked `[num_clients, dim]` tensor."""

    def __init__(self, config: StrategyConfig, dim: int):
        self.config, self.dim = config, dim
        self._rows: list[torch.Tensor] = []

    def add(self, client_id: int, update: Update) -> None:
        if update.delta.numel() != self.dim:
            raise ValueError(f"client {client_id}: update has {update.delta.numel()} elements, "
                             f"{self.config.name} expects {self.dim}")
        self._rows.append(update.delta.reshape(-1))

    def result(self) -> torch.Tensor:
        if not self._rows:
            raise TooFewUpdates(f"{self.config.name}: no client updates to aggregate")
        updates = torch.stack(self._rows)
        c, n = self.config, len(self._rows)
        if c.name == "median":
            return robust.coordinate_median(updates)
        if c.name == "trimmed_mean":
            return robust.trimmed_mean(updates, math.floor(c.trim_fraction * n + 1e-9))
        f = math.floor(c.byzantine_fraction * n + 1e-9)
        if n < f + 3:
            raise TooFewUpdates(f"{c.name} needs at least f + 3 = {f + 3} updates (f = {f} assumed Byzantine), got {n}")
        if c.name == "krum":
            return robust.krum(updates, f)
        return robust.multi_krum(updates, f, min(c.num_selected, n) if c.num_selected else n - f)


def make_aggregator(config: StrategyConfig, dim: int, *, seed: int = 0, round_idx: int = 0) -> Aggregator:
    if config.name == "secagg":
        from plait.federated.secagg import SecureAggregator  # needs `cryptography`

        return SecureAggregator(dim, config.secagg, weighting=config.weighting, seed=seed, round_id=round_idx)
    if config.name == "fedavg":
        return FedAvgAggregator(dim, config.weighting)
    return RobustAggregator(config, dim)
