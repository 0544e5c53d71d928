"""Aggregation rules as pure functions on flat tensors.

FedAvg's weighted mean `w = sum_k (n_k / n) w_k` is kept as a running sum (fedjax's habit): the server folds each
update in as it arrives and never holds all client updates at once. Robust rules that need every update at once
(median, trimmed mean, Krum) take a stacked `[num_clients, dim]` tensor instead.
"""

from __future__ import annotations

import torch


class RunningWeightedSum:
    """Accumulates `sum_k weight_k * x_k` and `sum_k weight_k`, one update at a time.

    The sum is kept in float64 and the mean rounded to the updates' dtype: a float32 update times an integer weight
    is exact in float64, and the float64 sum's rounding is far below float32's, so the mean no longer depends on the
    order in which updates arrive (over a network, the order of the clients' replies)."""

    __slots__ = ("total", "weight", "count", "dtype")

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.dtype = dtype
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.weight = 0.0
        self.count = 0

    def add(self, x: torch.Tensor, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"aggregation weight must be >= 0, got {weight}")
        if x.shape != self.total.shape:
            raise ValueError(f"update has shape {tuple(x.shape)}, aggregate expects {tuple(self.total.shape)}")
        self.total.add_(x, alpha=float(weight))  # x is promoted to float64 in the op: no copy
        self.weight += float(weight)
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("weighted mean of no updates (total weight 0)")
        return (self.total / self.weight).to(self.dtype)


def weighted_mean(updates: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """`sum_k w_k x_k / sum_k w_k`, folded one update at a time."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"need as many weights as updates (>0), got {len(updates)} updates, {len(weights)} weights")
    acc = RunningWeightedSum(updates[0].numel(), updates[0].dtype, updates[0].device)
    for x, w in zip(updates, weights):
        acc.add(x.reshape(-1), w)
    return acc.mean().view_as(updates[0])
