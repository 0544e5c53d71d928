"""The user's model and task (or the presets), built from the config and checked against the data at start: a
wrong reference, a factory that returns no module, or a model whose output does not fit the loss stops the run
before anything is written, with a message naming the setting."""

from __future__ import annotations

from typing import Any

import torch

from plait.core.models import build_model as build_preset
from plait.federated.config import FLConfig, ModelConfig
from plait.federated.task import BUILT_IN, Inputs, Regression, Task, take
from plait.user_code import resolve, resolve_callable


def build_model(config: ModelConfig, num_classes: int = 0) -> torch.nn.Module:
    """A fresh model: the user's factory called with `model.options`, or a preset."""
    if not config.factory:
        return build_preset(config.name, **({"vocab_size": num_classes} if config.name == "char_lstm" else {}))
    factory = resolve_callable(config.factory, "model.factory", config.options)
    try:
        model = factory(**config.options)
    except Exception as err:
        raise ValueError(f"model.factory = {config.factory!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model.factory = {config.factory!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


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
    sample_x, sample_y = take(x, slice(0, 2)), y[:2]
    was_training = model.training
    model.eval()  # a check must not move BatchNorm's running statistics (they are part of the initial model)
    try:
        with torch.no_grad():
            outputs = task.forward(model, sample_x)
    except Exception as err:
        raise ValueError(f"{setting}: the model does not take the data's inputs ({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)
    if not isinstance(task, Regression) and isinstance(outputs, torch.Tensor) and outputs.dim() == 2 \
            and num_classes > outputs.shape[1]:
        raise ValueError(f"{setting}: the data's labels go up to {num_classes - 1} but the model has "
                         f"{outputs.shape[1]} outputs")
    try:
        with torch.no_grad():
            task.loss(outputs, sample_y)
    except Exception as err:
        raise ValueError(f"{setting}: the model's output does not fit the task's loss on a sample "
                         f"({type(err).__name__}: {err})") from err
