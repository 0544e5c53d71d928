"""A cluster plane's data (data parallel, pipeline, parameter server): one training set and an optional test set,
either a built-in image set (uint8 images, each plane scales them its own way) or the user's own (`data.source`,
pooled into one set: data/user.py). The ranks split the training set among themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plait.data.images import load_image_set
from plait.data.user import Labelled, load_training_set


@dataclass(slots=True)
class ClusterSets:
    train: Labelled
    test: Labelled | None       # None: the user's data has no test split (and no data.test_path): no test metrics
    images: bool                # a built-in set: inputs are uint8 images [N, 28, 28], still to be scaled
    num_classes: int            # 0 for real-valued targets

    @property
    def train_x(self) -> torch.Tensor:
        assert isinstance(self.train.x, torch.Tensor)  # load_training_set refuses several inputs
        return self.train.x


def load_cluster_sets(*, name: str, path: str | None, source: str, test_path: str,
                      cache_dir: str = "") -> ClusterSets:
    if source:
        train, test = load_training_set(source, test_path)
        labels = [train.y] + ([test.y] if test is not None and len(test) else [])
        classes = 0 if train.y.is_floating_point() else max(int(y.max()) for y in labels) + 1
        return ClusterSets(train, test, images=False, num_classes=classes)
    arrays = load_image_set(name, path or None, Path(cache_dir) if cache_dir else None)
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    return ClusterSets(Labelled(tensors["train_x"], tensors["train_y"]), Labelled(tensors["test_x"], tensors["test_y"]),
                       images=True, num_classes=10)
