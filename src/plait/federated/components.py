"""The user's model and task (or the presets), built from the config and checked against the data at start: a
wrong reference, a factory that returns no module, or a model whose output does not fit the loss stops the run
before anything is written, with a message naming the setting."""

from __future__ import annotations

from typing import Any

import torch

from plait import user_model
from plait.core.models import LANGUAGE_MODELS
from plait.core.models import build_model as build_preset
from plait.federated.config import FLConfig, ModelConfig
from plait.federated.task import BUILT_IN, Inputs, Regression, Task
from plait.user_code import resolve


def build_model(config: ModelConfig, num_classes: int = 0) -> torch.nn.Module:
    """A fresh model: the user's factory called with `model.options`, or a preset (the same builder as every
    plane's, plait/user_model.py)."""
    extra = {"vocab_size": num_classes} if config.name in LANGUAGE_MODELS else {}
    return user_model.build_model(config, preset=lambda: build_preset(config.name, **extra))


def build_task(fl: FLConfig) -> Task:
    if fl.task in BUILT_IN:
        return BUILT_IN[fl.task]()
    found: Any = resolve(fl.task, "fl.task")
    if isinstance(found, type):
        try:
            found = found()
        except TypeError as err:
            raise ValueError(f"fl.task = {fl.task!r}: the class must take no arguments ({err})") from err
    missing = [m for m in ("forward", "train_loss", "eval_sums") if not callable(getattr(found, m, None))]
    if missing:
        raise ValueError(f"fl.task = {fl.task!r}: a {type(found).__name__} has no {missing}; subclass "
                         "plait.federated.Task")
    task: Task = found
    return task


def check_model_fits(task: Task, model: torch.nn.Module, x: Inputs, y: torch.Tensor, num_classes: int,
                     setting: str = "model.factory") -> None:
    """One forward and loss on two examples: the model must take the data and its output must fit the loss."""
    user_model.check_model_fits(model, x, y, num_classes, loss=task.loss, forward=task.forward,
                                classification=not isinstance(task, Regression), setting=setting)
