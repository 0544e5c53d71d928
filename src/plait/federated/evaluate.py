"""Evaluation of a flat model state on a data set, with the task's metrics (default: mean cross-entropy and
accuracy), the model in eval mode, on the model's device (the weights and the data moved there)."""

from __future__ import annotations

import math

import torch

from plait.core.flat import FlatSpec
from plait.data.user import take
from plait.federated.device import model_device, on_device
from plait.federated.task import EVAL_BATCH, GPU_EVAL_BATCH, Inputs, Task, evaluate_batches
from plait.federated.weights import pointed_at


def evaluate(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, x: Inputs, y: torch.Tensor,
             task: Task | None = None, local: tuple[torch.Tensor, FlatSpec] | None = None,
             batch_size: int = 0) -> dict[str, float]:
    """The task's metrics of the weights `params` (and, with `local`, a client's own buffers) on (x, y), in
    batches of `batch_size` (0: small on the CPU, large on a GPU)."""
    device = model_device(model)
    batch_size = batch_size or (EVAL_BATCH if device.type == "cpu" else GPU_EVAL_BATCH)
    if local is not None:
        local = (local[0].to(device), local[1])
    with pointed_at(model, spec, params.detach().to(device), local=local):
        return evaluate_batches(task or Task(), model, on_device(x, device), y.to(device), batch_size)


# Outputs this large overflow a float32 loss (a square, an exponential) though finite themselves: 1e18² is past
# float32's 3.4e38.
OVERFLOWING_OUTPUT = 1e18


def largest_output(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, x: Inputs, task: Task | None = None,
                   examples: int = 256) -> float:
    """The largest |value| among the model's outputs (every floating tensor among them; outputs of another kind
    are skipped, 0.0 when none is a tensor) for the weights `params` on the first `examples` of `x`: inf or nan
    when one is not finite. Finite weights grown large give a NaN or infinite loss that no evaluation code made:
    outputs not finite, or at OVERFLOWING_OUTPUT and above."""
    device, was_training = model_device(model), model.training
    model.eval()  # as evaluated; in training mode BatchNorm would write its statistics into `params`
    try:
        with torch.no_grad(), pointed_at(model, spec, params.detach().to(device)):
            outputs = (task or Task()).forward(model, on_device(take(x, slice(0, examples)), device))
    finally:
        model.train(was_training)
    largest = 0.0
    for tensor in _tensors(outputs):
        if not bool(torch.isfinite(tensor).all()):
            return math.inf
        if tensor.numel():
            largest = max(largest, float(tensor.detach().abs().max()))
    return largest


def _tensors(outputs: object) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() or outputs.is_complex() else []
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _tensors(item)]
    if isinstance(outputs, dict):
        return [t for item in outputs.values() for t in _tensors(item)]
    return []


# What a round's record calls the central test set's figures (runtime/metric_names.py); a task's other metrics
# keep their own names.
TEST_SET_NAMES = {"accuracy": "test_accuracy", "loss": "test_loss", "top3_accuracy": "test_top3_accuracy"}


def test_set_record(metrics: dict[str, float]) -> dict[str, float]:
    """`evaluate`'s figures on the central test set under the names a round's record gives them."""
    return {TEST_SET_NAMES.get(k, k): v for k, v in metrics.items() if k != "num_examples"}
