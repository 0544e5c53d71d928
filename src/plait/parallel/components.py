"""A data-parallel or pipeline run's model and data, built from its config: the presets (FedAvg models, MNIST) or
the user's own (`model.factory`, `data.source`), built by the same code as every plane's (plait/user_model.py,
data/user.py) and checked at start: `check_user_code` raises before the driver writes the run directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.core.models import build_model as build_preset
from plait.data.cluster import ClusterSets, load_cluster_sets
from plait.settings.sections import ModelSection, UserDataSection
from plait.user_model import build_model, check_run_code

_MEAN, _STD = 0.1307, 0.3081  # MNIST pixel statistics
Prepare = Callable[[torch.Tensor], torch.Tensor]


def normalized_images(images_u8: torch.Tensor) -> torch.Tensor:
    """Data parallel's scaling of a batch of uint8 images: [N, 28, 28] -> [N, 1, 28, 28], MNIST-normalised."""
    return images_u8.to(torch.float32).div_(255.0).sub_(_MEAN).div_(_STD).unsqueeze(1)


def unit_images(images_u8: torch.Tensor) -> torch.Tensor:
    """The pipeline's: [N, 28, 28] -> [N, 1, 28, 28] in [0, 1]."""
    return images_u8.unsqueeze(1).to(torch.float32).div_(255.0)


def _as_given(inputs: torch.Tensor) -> torch.Tensor:
    return inputs


@dataclass(slots=True)
class RunData:
    """The training and test tensors on the host, and how a gathered batch of inputs becomes the model's input
    (the images are scaled per batch, on the device; the user's inputs are used as given)."""
    sets: ClusterSets
    prepare: Prepare

    @property
    def has_test(self) -> bool:
        return self.sets.test is not None and len(self.sets.test) > 0


def load_run_data(data: UserDataSection, *, name: str, path: str | None, cache_dir: str = "",
                  prepare_images: Prepare) -> RunData:
    sets = load_cluster_sets(name=name, path=path, source=data.source, test_path=data.test_path, cache_dir=cache_dir)
    return RunData(sets, prepare_images if sets.images else _as_given)


def build_image_model(section: ModelSection) -> torch.nn.Module:
    """Data parallel's model: the user's factory, or a FedAvg-paper preset by `model.name`."""
    return build_model(section, preset=lambda: build_preset(section.name))


def check_user_code(model: torch.nn.Module, section: ModelSection, data: RunData, task: str, *,
                    sample_device: torch.device | None = None) -> None:
    """The user's model or data checked together at start: the targets fit `train.task`, the model takes two
    examples and its output fits the loss. Raises ValueError naming the setting. `sample_device`: where the two
    examples go first (the meta device for a meta-built model: shapes and dtypes are checked, nothing computed)."""
    train, test = data.sets.train, data.sets.test
    x, y = data.prepare(data.sets.train_x[:2]), train.y[:2]
    if sample_device is not None:
        x, y = x.to(sample_device), y.to(sample_device)
    check_run_code(model, section, task, train_y=train.y, test_y=None if test is None else test.y, x=x, y=y,
                   num_classes=data.sets.num_classes)
