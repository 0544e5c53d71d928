"""What a model does with a batch: the user's to replace. `Task` is supervised classification (cross-entropy,
accuracy); `Regression` is mean squared error. A user's task subclasses either and overrides what differs:

    class MyTask(plait.federated.Task):
        def loss(self, outputs, targets):
            return torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)

Inputs may be one tensor or a tuple of tensors (a model with several inputs: `model(*inputs)`). The same task
object runs in the simulator, in its worker processes (it is pickled: define it in an importable module) and
behind `plait fl client`. Named in a config as `fl.task = "classification" | "regression" | "pkg.module:MyTask"`;
next-word prediction also reports top-3 accuracy: `fl.task = "plait.federated.task:NextWord"`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from plait.data.user import Inputs, take
from plait.federated.batch_threads import on_threads

__all__ = ["BUILT_IN", "Inputs", "NextWord", "Regression", "Task", "evaluate_batches", "take", "top_k_hits"]


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows of `logits` [batch, classes] have their target among their k highest scores."""
    best = logits.topk(min(k, logits.shape[1]), dim=1).indices  # [batch, k]
    return (best == targets.unsqueeze(1)).any(dim=1).sum()


class Task:
    """Supervised classification: cross-entropy on the model's logits, accuracy by arg-max, and for each k in
    `top_k` the top-k accuracy (`top3_accuracy`: the target among the 3 highest logits)."""

    top_k: tuple[int, ...] = ()

    def forward(self, model: torch.nn.Module, inputs: Inputs) -> Any:
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch (what training minimises)."""
        return F.cross_entropy(outputs, targets)

    def train_loss(self, model: torch.nn.Module, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor:
        """One training step's loss; override for anything beyond forward-then-loss."""
        return self.loss(self.forward(model, inputs), targets)

    def eval_sums(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over a batch of evaluation data, added up over batches and divided by the example count. (The batch
        size as `targets.shape[0]`, not `len(targets)`: a traced program then takes any batch size.)"""
        sums = {"loss": self.loss(outputs, targets).double() * targets.shape[0],
                "accuracy": (outputs.argmax(dim=1) == targets).sum().double()}
        for k in self.top_k:
            sums[f"top{k}_accuracy"] = top_k_hits(outputs, targets, k).double()
        return sums


class NextWord(Task):
    """Next-word (or next-character) prediction: classification that also reports top-3 accuracy, which is what
    a keyboard's three suggestions get right (`test_top3_accuracy` in a round's record)."""

    top_k = (3,)


class Regression(Task):
    """Mean squared error; the reported loss is the MSE (no accuracy)."""

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.reshape(targets.shape), targets)

    def eval_sums(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(outputs, targets).double() * targets.shape[0]}


BUILT_IN = {"classification": Task, "regression": Regression, "next_word": NextWord}


# Examples per evaluation batch on the CPU. Smaller is both leaner and no slower there: the MNIST CNN's 10,000 test
# images took 4.2-4.9 s in batches of 2000 (peak 685 MB: one batch's activations are 400 MB), 3.2-3.3 s in batches
# of 256 (364-371 MB) and 3.0-3.5 s in batches of 128 (329 MB), on two threads. A GPU wants large batches.
EVAL_BATCH = 128
GPU_EVAL_BATCH = 2048


@torch.inference_mode()
def evaluate_batches(task: Task, model: torch.nn.Module, inputs: Inputs, targets: torch.Tensor,
                     batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """The task's metrics over a whole set, in batches, with the model in eval mode (dropout off, BatchNorm on
    its running statistics); the model's mode is restored afterwards."""
    count = len(targets)
    if count == 0:
        return {"num_examples": 0}
    was_training = model.training
    model.eval()
    starts = range(0, count, batch_size)

    def batch_sums(index: int) -> dict[str, torch.Tensor]:
        part = slice(starts[index], starts[index] + batch_size)
        return task.eval_sums(task.forward(model, take(inputs, part)), targets[part])

    try:
        # on the CPU, batches go to Python threads with one torch thread each (batch_threads.py); a GPU takes them
        # one after the other
        on_cpu = targets.device.type == "cpu"
        per_batch = on_threads(batch_sums, len(starts)) if on_cpu else [batch_sums(i) for i in range(len(starts))]
    finally:
        model.train(was_training)
    sums: dict[str, torch.Tensor] = {}
    for batch in per_batch:  # in batch order: the same bits on any number of threads
        for key, value in batch.items():
            sums[key] = sums[key] + value if key in sums else value
    return {**{key: float(value) / count for key, value in sums.items()}, "num_examples": count}
