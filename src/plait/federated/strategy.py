"""Aggregation strategies: fold client updates in as they arrive, produce the aggregated delta.

FedAvg weights client k by n_k (or uniformly) and keeps a running sum, so the server never holds all updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from plait.core.aggregate import RunningWeightedSum
from plait.federated.client_update import Update


@dataclass(kw_only=True, slots=True)
class StrategyConfig:
    name: Literal["fedavg"] = "fedavg"
    weighting: Literal["examples", "uniform"] = "examples"


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


def make_aggregator(config: StrategyConfig, dim: int) -> Aggregator:
    return FedAvgAggregator(dim, config.weighting)
