"""Your own model and data, as Plait runs them: a small CNN with BatchNorm and dropout, and a data set Plait does
not ship (8×8 images of four shapes, generated here), split among clients by Plait's partitioners.

Named from a config (`fl.toml`) as `model = "shapes.py:make_net"` and `data = "shapes.py:load"`; a network client
can take its own share with `load_client(client_id=K)`, or read its own file (`write_client_folders.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SHAPES = 4  # classes: horizontal bar, vertical bar, diagonal, square


def make_net(channels: int = 8, dropout: float = 0.25) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 16, SHAPES),
    )


def _draw(kind: int, rng: np.random.Generator) -> np.ndarray:
    image = np.zeros((8, 8), dtype=np.float32)
    at = int(rng.integers(1, 7))
    if kind == 0:
        image[at, 1:7] = 1
    elif kind == 1:
        image[1:7, at] = 1
    elif kind == 2:
        np.fill_diagonal(image, 1)
    else:
        image[2:6, 2] = image[2:6, 5] = image[2, 2:6] = image[5, 2:6] = 1
    return image + rng.normal(0, 0.3, image.shape).astype(np.float32)


def make_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, SHAPES, count)
    images = np.stack([_draw(int(k), rng) for k in labels])[:, None]  # [count, 1, 8, 8]
    return torch.from_numpy(images), torch.from_numpy(labels)


def load(examples: int = 2400) -> dict[str, torch.Tensor]:
    """The whole set for the simulator to partition (data.partition), with a test set of its own."""
    x, y = make_images(examples, seed=1)
    test_x, test_y = make_images(600, seed=2)
    return {"x": x, "y": y, "test_x": test_x, "test_y": test_y}


def load_client(client_id: int, examples: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """One network client's own data (another seed per client: nothing of anyone else's)."""
    return make_images(examples, seed=100 + client_id)
