"""Evaluation of flat parameters on a labelled set: mean cross-entropy and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from plait.core.flat import FlatSpec, split_views


@torch.inference_mode()
def evaluate(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2000) -> dict[str, float]:
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0}
    views = split_views(params, spec)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    for start in range(0, len(y), batch_size):
        logits = functional_call(model, views, (x[start : start + batch_size],))
        target = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    return {"loss": float(loss_sum) / len(y), "accuracy": int(correct) / len(y), "num_examples": len(y)}
