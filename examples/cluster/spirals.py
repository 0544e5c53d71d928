"""Your own model and data for `plait train` (examples/cluster/own_model.toml names them): two interleaved
spirals in the plane, labelled 0 and 1, and an MLP written as an nn.Sequential (so the pipeline can cut it too).

    plait train examples/cluster/own_model.toml --nproc 2
"""

from __future__ import annotations

import torch
from torch import nn


def make_net(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _spirals(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(count, generator=generator) * 12
    y = torch.randint(0, 2, (count,), generator=generator)
    x = torch.stack([t * torch.cos(t + torch.pi * y), t * torch.sin(t + torch.pi * y)], dim=1) / 12
    return x + 0.02 * torch.randn(count, 2, generator=generator), y


def load(examples: int = 4096) -> dict[str, torch.Tensor]:
    """The training set, and a test set of its own (`plait train` reports its accuracy at the end)."""
    generator = torch.Generator().manual_seed(0)
    x, y = _spirals(examples, generator)
    test_x, test_y = _spirals(1024, generator)
    return {"x": x, "y": y, "test_x": test_x, "test_y": test_y}
