"""Client execution backends: given the global weights and a list of client tasks, yield each client's update.

Every backend runs the same `client_update`, on the device its model lives on (fl.device), and yields updates on
the CPU; the server does not know which one it talks to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, Update, client_update
from plait.federated.device import model_device
from plait.federated.plan import TrainingPlan
from plait.federated.task import Task


@dataclass(slots=True)
class ClientTask:
    client_id: int
    plan: TrainingPlan
    data: ClientData
    task: Task | None = None                          # the user's task (default: classification)
    local: tuple[torch.Tensor, FlatSpec] | None = None  # the client's own buffers (fl.buffers = "local")


class ClientExecutor(Protocol):
    def run(self, model: torch.nn.Module, spec: FlatSpec, global_params: torch.Tensor,
            tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Update]]: ...

    def close(self) -> None: ...


class SequentialExecutor:
    """One client after another in this process, on the model's device: the reference backend. `train_threads`:
    torch threads while a client trains (0: the process's setting). A small model's ops are too short to share
    between cores: with two threads a 2NN client took two to three times as long as with one (fl.worker_threads,
    which `auto` sets by measuring both)."""

    def __init__(self, train_threads: int = 0):
        self.train_threads = train_threads

    def run(self, model, spec, global_params, tasks):
        params = global_params.to(model_device(model))  # once a round, not once a client
        # the caller's checks and sums between clients too: switching back to more threads for those short ops
        # would leave the others spinning through the next client's training
        with torch_threads(self.train_threads):
            for task in tasks:
                try:
                    update = client_update(model, spec, params, task.data, task.plan, task.task, task.local)
                except Exception as err:  # name the client and the stage in every error (fedjax's debug backend)
                    raise RuntimeError(f"client {task.client_id}: local training failed: {err}") from err
                yield task, update.cpu()

    def close(self) -> None:
        pass


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` within the block (0: left as they are)."""
    before = torch.get_num_threads()
    if count and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count and count != before:
            torch.set_num_threads(before)
