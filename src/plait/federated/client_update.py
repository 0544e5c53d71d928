"""Local training on one client: `client_update(global_params, client_data, plan) -> Update`.

The same function runs in-process, in a worker process, or behind the gRPC client. The weights being trained are
one flat tensor `w`: for the client's whole run the model's own parameters are re-pointed into it (`.data` views,
as DDP and FSDP flatten parameters), so the delta at the end is one subtraction, with no per-step gather,
concatenation, or parameter swap: `torch.func.functional_call` swapped the parameters in and out on every step,
about 30 µs of a 430 µs 2NN step (benchmarks/fl_simulator.py). Each step's gradients come from `autograd.grad`
and the SGD step is one multi-tensor op over the parameters (as torch.optim's foreach SGD): accumulating into
`.grad` views of a flat buffer instead cost a zeroing pass and an addition pass over every gradient, 470 against
410 µs a 2NN step on one core. The parameters get their own memory back when the client is done, so the module
is left as it was; a model must not be trained by two callers at once. Parameters with `requires_grad=False` are
left as they are, as torch.optim leaves them.

A client trains on its model's device (fl.device, net.client_device): the weights, its batches and its own buffers
are moved there (no copy when they are there already), and the update stays there; `Update.cpu()` brings it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from plait.core.flat import FlatSpec, split_views
from plait.federated.device import model_device, on_device
from plait.federated.plan import TrainingPlan
from plait.federated.task import Inputs, Task, take
from plait.federated.weights import pointed_at

CHUNK = 4096  # examples of a full batch (B = 0) that go through forward and backward at once


@dataclass(slots=True)
class ClientData:
    x: Inputs                    # one tensor, or a tuple of tensors for a model with several inputs; raw if `convert`
    y: torch.Tensor
    # raw rows -> what the model reads (uint8 images -> normalised floats), applied where the client trains: a pool
    # ships the raw rows (a quarter of the bytes) and each worker converts its own, in parallel
    convert: Callable[[Inputs], Inputs] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, rows: torch.Tensor | slice | None = None) -> Inputs:
        """The inputs the model reads (those of `rows` only, when given)."""
        x = self.x if rows is None else take(self.x, rows)
        return self.convert(x) if self.convert is not None else x


@dataclass(slots=True)
class Update:
    delta: torch.Tensor          # local weights minus the global weights, flat
    num_examples: int            # n_k, the client's weight in FedAvg
    metrics: dict[str, float] = field(default_factory=dict)
    local_buffers: torch.Tensor | None = None  # the client's own buffers after training (fl.buffers = "local")

    def cpu(self) -> Update:
        """The update on the CPU, where the server aggregates (itself when it is there already)."""
        if self.delta.device.type == "cpu":
            return self
        buffers = self.local_buffers.cpu() if self.local_buffers is not None else None
        return Update(self.delta.cpu(), self.num_examples, self.metrics, buffers)


def client_update(model: torch.nn.Module, spec: FlatSpec, global_params: torch.Tensor, data: ClientData,
                  plan: TrainingPlan, task: Task | None = None,
                  local: tuple[torch.Tensor, FlatSpec] | None = None, *, seed_global_rng: bool = True) -> Update:
    """`plan`'s local SGD from `global_params` on `data`, with `task`'s loss (default: classification), on the
    model's device. `local`: the client's own buffers (vector, spec), trained in place of the model's and returned in
    the update. `seed_global_rng=False` leaves torch's global generator alone: for callers training clients in
    several threads at once, whose models must not draw from it (it is one per process)."""
    if len(data) == 0:
        raise ValueError("client has no training examples")
    task = task or Task()
    device = model_device(model)
    global_params = global_params.detach().to(device)
    data = ClientData(on_device(data.inputs(), device), data.y.to(device))
    w = global_params.clone()
    own = (local[0].to(device, copy=True), local[1]) if local is not None else None
    # The global generator (dropout masks, any randomness in the user's model; the GPU's too when training on one)
    # is seeded by the plan for the client's run and restored after it: a client's update depends on (seed, round,
    # client) alone, whichever process or backend runs it, and resumed runs repeat.
    devices = [w.get_device()] if w.is_cuda else []
    with pointed_at(model, spec, w, None, own), torch.random.fork_rng(devices, enabled=seed_global_rng):
        if seed_global_rng:
            _seed_generators(plan.seed, w.device)
        was_training = model.training
        model.train()
        try:
            steps, loss_sum = _train(model, task, spec, global_params, data, plan)
        finally:
            model.train(was_training)
    delta = w - global_params
    # One host sync per client, for the log only.
    return Update(delta, len(data), {"train_loss": float(loss_sum) / max(steps, 1), "steps": steps},
                  own[0] if own is not None else None)


def _seed_generators(seed: int, device: torch.device) -> None:
    """The generators `fork_rng` restores, seeded: the CPU's and the training device's. `torch.manual_seed` also
    queues a seeding for every accelerator not yet initialised, with a stack trace each: 100 µs a call on a
    machine without one, a client's fixed cost."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _train(model: torch.nn.Module, task: Task, spec: FlatSpec, global_params: torch.Tensor, data: ClientData,
           plan: TrainingPlan) -> tuple[int, torch.Tensor]:
    """The local SGD steps on the model's parameters (views into the flat weights). Federated buffers after the
    parameters change in the forward passes."""
    named = dict(model.named_parameters())
    trained = [name for name in spec.names if name not in spec.buffers and named[name].requires_grad]
    params: list[torch.Tensor] = [named[name] for name in trained]
    global_views = split_views(global_params, spec) if plan.prox_mu else {}
    anchors = [global_views[name] for name in trained] if plan.prox_mu else []
    velocity = [torch.zeros_like(p) for p in params] if plan.momentum else None
    generator = torch.Generator().manual_seed(plan.seed)
    num_examples = len(data)
    batch = num_examples if plan.batch_size == 0 else plan.batch_size
    total_steps = plan.num_steps(num_examples)
    loss_sum = torch.zeros((), device=global_params.device)
    steps = 0
    while steps < total_steps:
        # drawn on the CPU generator whatever the device, so a client's batches are the same on every device
        order = torch.randperm(num_examples, generator=generator).to(global_params.device)
        for start in range(0, num_examples, batch):
            if steps >= total_steps:
                break
            loss, grads = _batch_gradients(model, task, data, order[start : start + batch], params)
            with torch.no_grad():
                step: list[torch.Tensor] | tuple[torch.Tensor, ...] = grads
                if plan.weight_decay:
                    step = torch._foreach_add(step, params, alpha=plan.weight_decay)
                if plan.prox_mu:
                    step = torch._foreach_add(step, torch._foreach_sub(params, anchors), alpha=plan.prox_mu)
                if velocity is not None:
                    torch._foreach_mul_(velocity, plan.momentum)
                    torch._foreach_add_(velocity, step)
                    step = velocity
                torch._foreach_add_(params, step, alpha=-plan.lr)
            loss_sum += loss
            steps += 1
    return steps, loss_sum


def _batch_gradients(model: torch.nn.Module, task: Task, data: ClientData, idx: torch.Tensor,
                     params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The batch's mean loss and its gradient for each of `params` (zeros for one the loss does not use). A full
    batch (B = 0) larger than CHUNK examples goes through in chunks, each loss weighted by its share of the batch:
    the same gradient of the batch-mean loss (to float rounding) without holding the activations of every example
    at once (a Shakespeare role's 60,000 windows through an LSTM need tens of GB). Not for batch-dependent layers
    (BatchNorm's statistics would be per chunk): those take the batch whole, as do batches of CHUNK or fewer."""
    if len(idx) <= CHUNK or _batch_dependent(model):
        loss = task.train_loss(model, take(data.x, idx), data.y[idx])
        return loss.detach(), list(torch.autograd.grad(loss, params, materialize_grads=True))
    total = torch.zeros((), device=idx.device)
    grads: list[torch.Tensor] = []
    for part in torch.split(idx, CHUNK):
        loss = task.train_loss(model, take(data.x, part), data.y[part]) * (len(part) / len(idx))
        part_grads = torch.autograd.grad(loss, params, materialize_grads=True)
        if grads:
            torch._foreach_add_(grads, part_grads)
        else:
            grads = list(part_grads)
        total += loss.detach()
    return total, grads


def _batch_dependent(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
