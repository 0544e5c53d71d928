"""The model a config names, built and checked the same way in every plane: the user's factory
(`model.factory = "pkg.module:make_model"`, called with `model.options`) or the plane's preset; then one forward and
loss on two examples of the run's data, so a model that does not fit the data or the loss stops the run at start,
before anything is written, with a message naming the setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.settings.sections import ModelSection
from plait.user_code import resolve_callable

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def build_model(section: ModelSection, preset: Callable[[], nn.Module]) -> nn.Module:
    """A fresh model: the user's factory called with `model.options`, or `preset()` when none is named."""
    if not section.factory:
        return preset()
    factory = resolve_callable(section.factory, "model.factory", section.options)
    try:
        model = factory(**section.options)
    except Exception as err:
        raise ValueError(f"model.factory = {section.factory!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.factory = {section.factory!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; an output of shape [N, 1] meets targets of shape [N]."""
    return F.mse_loss(outputs.reshape(targets.shape), targets)


def task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`train.task`'s loss: "classification" (cross-entropy) or "regression" (MSE)."""
    return regression_loss if task == "regression" else classification_loss


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def check_model_fits(model: nn.Module, x: Inputs, y: torch.Tensor, num_classes: int, *,
                     loss: Callable[[Any, torch.Tensor], torch.Tensor],
                     forward: Callable[[nn.Module, Inputs], Any] = call_model, classification: bool = True,
                     setting: str = "model.factory") -> None:
    """One forward and loss on two examples: the model must take the data and its output must fit the loss."""
    sample_x = tuple(t[:2] for t in x) if isinstance(x, tuple) else x[:2]
    sample_y = y[:2]
    was_training = model.training
    model.eval()  # a check must not move BatchNorm's running statistics (they are part of the initial model)
    try:
        with torch.no_grad():
            outputs = forward(model, sample_x)
    except Exception as err:
        raise ValueError(f"{setting}: the model does not take the data's inputs ({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)
    if classification and isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and num_classes > outputs.shape[1]:
        raise ValueError(f"{setting}: the data's labels go up to {num_classes - 1} but the model has "
                         f"{outputs.shape[1]} outputs (give its last layer {num_classes}, one per class)")
    try:
        with torch.no_grad():
            loss(outputs, sample_y)
    except Exception as err:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"{setting}: the model's output does not fit the task's loss on a sample: output {shape}, "
                         f"targets {tuple(sample_y.shape)} {sample_y.dtype} ({type(err).__name__}: {err})") from err


def check_targets(task: str, targets: torch.Tensor, where: str) -> None:
    """Class labels for classification, float targets for regression: a mismatch is named before the run starts."""
    if task == "classification" and targets.is_floating_point():
        raise ValueError(f"{where}: train.task = 'classification' needs integer class labels, got {targets.dtype} "
                         "targets (set train.task = 'regression' for real-valued targets)")
    if task == "classification" and len(targets) and int(targets.min()) < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {int(targets.min())}")
    if task == "regression" and not targets.is_floating_point():
        raise ValueError(f"{where}: train.task = 'regression' needs float targets, got {targets.dtype} (class labels "
                         "go with train.task = 'classification')")


def check_run_code(model: nn.Module, section: ModelSection, task: str, *, train_y: torch.Tensor,
                   test_y: torch.Tensor | None, x: Inputs, y: torch.Tensor, num_classes: int) -> None:
    """A cluster run's model and data checked together at start: the targets fit `train.task`, the model takes
    the sample `x` and its output fits the task's loss on `y`. Raises ValueError naming the setting."""
    check_targets(task, train_y, "data.source")
    if test_y is not None and len(test_y):
        check_targets(task, test_y, "data.test_path or data.source's test set")
    setting = "model.factory" if section.factory else f"model.name = {section.name!r}"
    check_model_fits(model, x, y, num_classes, loss=task_loss(task), classification=task == "classification",
                     setting=setting)
