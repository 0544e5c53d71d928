"""Server optimizers: how the global model moves given the aggregated client delta (a pseudo-gradient's negative).

FedAvg is SGD with lr 1 on the mean delta (w ← w + mean Δ); FedAvgM adds server momentum (Hsu et al. 2019).
Each optimizer is `init(params) -> state` and `apply(params, delta, state) -> (params, state)` over flat tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True, slots=True)
class ServerOptConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"server_opt.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_opt.momentum must be in [0, 1), got {self.momentum}")


class ServerSGD:
    def __init__(self, config: ServerOptConfig):
        self.config = config

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"velocity": torch.zeros_like(params)} if self.config.momentum else {}

    def apply(self, params: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor]):
        step = delta
        if self.config.momentum:
            step = state["velocity"].mul_(self.config.momentum).add_(delta)
        return params + self.config.lr * step, state


def build_server_opt(config: ServerOptConfig) -> ServerSGD:
    return ServerSGD(config)
