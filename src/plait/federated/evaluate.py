"""Evaluation of a flat model state on a data set, with the task's metrics (default: mean cross-entropy and
accuracy), the model in eval mode."""

from __future__ import annotations

import torch

from plait.core.flat import FlatSpec
from plait.federated.task import Inputs, Task, evaluate_batches
from plait.federated.weights import pointed_at


def evaluate(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, x: Inputs, y: torch.Tensor,
             task: Task | None = None, local: tuple[torch.Tensor, FlatSpec] | None = None,
             batch_size: int = 2000) -> dict[str, float]:
    """The task's metrics of the weights `params` (and, with `local`, a client's own buffers) on (x, y)."""
    with pointed_at(model, spec, params.detach(), local=local):
        return evaluate_batches(task or Task(), model, x, y, batch_size)


# What a round's record calls the central test set's figures (runtime/metric_names.py); a task's other metrics
# keep their own names.
TEST_SET_NAMES = {"accuracy": "test_accuracy", "loss": "test_loss"}


def test_set_record(metrics: dict[str, float]) -> dict[str, float]:
    """`evaluate`'s figures on the central test set under the names a round's record gives them."""
    return {TEST_SET_NAMES.get(k, k): v for k, v in metrics.items() if k != "num_examples"}
