"""A regression task of your own: y = sin(3·x1) + x2² + noise, an MLP, mean squared error (no labels, no accuracy).

    plait run examples/custom_model/regression.toml
"""

from __future__ import annotations

import torch
from torch import nn


def make_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def load(examples: int = 2000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(count, 2, generator=generator) * 2 - 1
        y = torch.sin(3 * x[:, 0]) + x[:, 1] ** 2 + 0.05 * torch.randn(count, generator=generator)
        return x, y

    x, y = sample(examples)
    test_x, test_y = sample(500)
    return {"x": x, "y": y, "test_x": test_x, "test_y": test_y}
