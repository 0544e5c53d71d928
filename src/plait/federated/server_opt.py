"""Server optimizers: how the global model moves given the aggregated client delta (a pseudo-gradient's negative).

FedAvg is SGD with lr 1 on the mean delta (w ← w + mean Δ); FedAvgM adds server momentum (Hsu et al. 2019).
FedAdagrad, FedAdam and FedYogi follow Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2), with
no bias correction and v initialised to tau², as in the paper:

    m ← β1 m + (1 − β1) Δ
    v ← v + Δ²                              (adagrad)
    v ← β2 v + (1 − β2) Δ²                  (adam)
    v ← v − (1 − β2) Δ² sign(v − Δ²)        (yogi)
    w ← w + lr · m / (√v + tau)

Each optimizer is `init(params) -> state` and `apply(params, delta, state) -> (params, state)` over flat tensors.
Optimizers read and write only their own keys of `state`, so other stages may keep tensors in the same dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# The server rate each optimizer takes unless fl.server_opt.lr sets one. FedAvg is sgd at 1 (w ← w + mean Δ). An
# adaptive step moves every weight by about η a round whatever the size of its update, so 1 throws a model away:
# on examples/fedavg_mnist.toml (the 2NN, 100 Dirichlet clients, 20 rounds) adam and yogi at 1.0 diverged in round
# 2 and reached 94.2% at 0.01 (adam 91.7% at 0.03, 93.2% at 0.003; yogi 84.8% at 0.1); adagrad, whose v only
# grows, 93.6% at 0.1 and 92.0% at 0.01; sgd at 1.0 93.7% (2026-12-08, one seed).
DEFAULT_LR = {"sgd": 1.0, "adagrad": 0.1, "adam": 0.01, "yogi": 0.01}


@dataclass(kw_only=True, slots=True)
class ServerOptConfig:
    name: Literal["sgd", "adagrad", "adam", "yogi"] = "sgd"
    lr: float = 0.0          # server learning rate η; 0: the optimizer's own (DEFAULT_LR), set when the config is
                             # made, so a run's config.toml records the rate it used (Reddi et al. tune it)
    momentum: float = 0.0    # sgd only: FedAvgM's server momentum
    beta1: float = 0.9       # adaptive: first-moment decay
    beta2: float = 0.99      # adam, yogi: second-moment decay
    tau: float = 1e-3        # adaptive: degree of adaptivity (larger is closer to sgd with momentum)

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"server_opt.lr must be >= 0 (0: {self.name}'s default, {DEFAULT_LR[self.name]}), "
                             f"got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_opt.momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"server_opt.beta1 and server_opt.beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.tau <= 0:
            raise ValueError(f"server_opt.tau must be > 0, got {self.tau}")
        if self.momentum and self.name != "sgd":
            raise ValueError(f"server_opt.momentum applies to sgd only; {self.name} uses beta1")
        self.lr = self.lr or DEFAULT_LR[self.name]

    def rates_to_lower(self) -> str:
        """The settings a diverged run should lower: the clients' rate, and the server's when its step can be more
        than FedAvg's mean (a rate above 1, momentum, an adaptive step)."""
        plain = self.name == "sgd" and self.lr <= 1 and not self.momentum
        return "fl.plan.lr" if plain else "fl.plan.lr or fl.server_opt.lr"


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


class ServerAdaptive:
    """FedAdagrad / FedAdam / FedYogi: one class, the second-moment update differs."""

    def __init__(self, config: ServerOptConfig):
        self.config = config

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.config.tau ** 2)}

    def apply(self, params: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor]):
        c = self.config
        m, v = state["m"], state["v"]
        m.mul_(c.beta1).add_(delta, alpha=1 - c.beta1)
        sq = delta.square()
        if c.name == "adagrad":
            v.add_(sq)
        elif c.name == "adam":
            v.mul_(c.beta2).add_(sq, alpha=1 - c.beta2)
        else:  # yogi: v moves towards Δ² additively, so it grows or shrinks slowly
            v.sub_(sq * torch.sign(v - sq), alpha=1 - c.beta2)
        return params + c.lr * m / (v.sqrt() + c.tau), state


ServerOptimizer = ServerSGD | ServerAdaptive


def build_server_opt(config: ServerOptConfig) -> ServerOptimizer:
    return ServerSGD(config) if config.name == "sgd" else ServerAdaptive(config)
