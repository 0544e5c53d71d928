"""Local training on one client: `client_update(global_params, client_data, plan) -> Update`.

Written with `torch.func.functional_call` over a flat parameter buffer, so the same function runs in-process, in a
worker process, or behind the gRPC client. The weights being trained are one flat tensor `w`; the model's
parameters are leaf tensors sharing its memory, and their `.grad` are views into one flat gradient buffer that
backward accumulates into in place (DDP's gradient-as-bucket-view), so the SGD step is one vectorised op on `w`
with no per-step gather or concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from plait.core.flat import FlatSpec, split_views
from plait.federated.plan import TrainingPlan


@dataclass(slots=True)
class ClientData:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(slots=True)
class Update:
    delta: torch.Tensor          # local weights minus the global weights, flat
    num_examples: int            # n_k, the client's weight in FedAvg
    metrics: dict[str, float] = field(default_factory=dict)


def client_update(model: torch.nn.Module, spec: FlatSpec, global_params: torch.Tensor, data: ClientData,
                  plan: TrainingPlan) -> Update:
    if len(data) == 0:
        raise ValueError("client has no training examples")
    global_params = global_params.detach()
    w = global_params.clone()
    grad = torch.zeros_like(w)
    params = {name: view.detach().requires_grad_(True) for name, view in split_views(w, spec).items()}  # leaves sharing w
    for name, grad_view in split_views(grad, spec).items():
        params[name].grad = grad_view
    velocity = torch.zeros_like(w) if plan.momentum else None
    generator = torch.Generator().manual_seed(plan.seed)
    num_examples = len(data)
    batch = num_examples if plan.batch_size == 0 else plan.batch_size
    total_steps = plan.num_steps(num_examples)
    loss_sum = torch.zeros(())
    steps = 0
    while steps < total_steps:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch):
            if steps >= total_steps:
                break
            idx = order[start : start + batch]
            grad.zero_()
            loss = F.cross_entropy(functional_call(model, params, (data.x[idx],)), data.y[idx])
            loss.backward()  # accumulates into `grad` through the views
            with torch.no_grad():
                step = grad
                if plan.weight_decay:
                    step = step.add(w, alpha=plan.weight_decay)
                if plan.prox_mu:
                    step = step.add(w - global_params, alpha=plan.prox_mu)
                if velocity is not None:
                    step = velocity.mul_(plan.momentum).add_(step)
                w.sub_(step, alpha=plan.lr)
            loss_sum += loss.detach()
            steps += 1
    delta = w - global_params
    # One host sync per client, for the log only.
    return Update(delta, num_examples, {"train_loss": float(loss_sum) / max(steps, 1), "steps": steps})
