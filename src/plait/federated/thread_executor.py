"""Thread-pool client execution: several clients train at once in this process, each thread with one torch thread.

PyTorch releases the GIL inside its kernels and runs a CPU backward on the calling thread, so threads training
clients of a compute-bound model (a CNN) use every core, with none of a process pool's costs: one process holds
torch and the data once (a pool of two holds them three times), and updates need no shared-memory handle each.
Overhead-bound models (a small MLP) hold the GIL between kernels and gain nothing; `fl.executor = "auto"` measures
which is the case. Between rounds the main thread keeps its own torch threads for the server's evaluation.

torch's global generator is one per process, so clients trained at once cannot each seed it: this executor takes
only models that draw no random numbers in training (no dropout), checked on the first round's first client.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import threading
from collections import deque
from collections.abc import Iterator

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import Update, client_update
from plait.federated.device import CPU, model_device
from plait.federated.executor import ClientTask
from plait.federated.task import Task


class ThreadPoolExecutor:
    """`num_workers` threads (default: one per core), each with its own copy of the model, training on the CPU."""

    def __init__(self, model: torch.nn.Module, num_workers: int = 0, device: torch.device | None = None):
        if (device or model_device(model)) != CPU or model_device(model) != CPU:
            raise ValueError("fl.executor = 'threads' trains on the CPU; use 'sequential' for fl.device = 'cuda'")
        self.num_workers = num_workers or max(1, os.cpu_count() or 1)
        self._template = copy.deepcopy(model)
        self._copies = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="plait-client",
                                                           initializer=torch.set_num_threads, initargs=(1,))
        self._checked = False

    def run(self, model: torch.nn.Module, spec: FlatSpec, global_params: torch.Tensor,
            tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Update]]:
        if not tasks:
            return
        if not self._checked:
            _refuse_random_models(model, tasks[0])
            self._checked = True
        main_threads = torch.get_num_threads()
        params = global_params.detach().cpu()
        futures = deque(self._pool.submit(self._train, spec, params, task) for task in tasks)
        torch.set_num_threads(1)  # this thread's checks and sums, while the workers hold the cores (pool_executor.py)
        try:
            for task in tasks:  # in task order: the same sums as the sequential executor
                future = futures.popleft()  # a future holds its update: ten CNN updates are 66 MB
                try:
                    update = future.result()
                except Exception as err:
                    raise RuntimeError(f"client {task.client_id}: local training failed: {err}") from err
                del future
                yield task, update
        finally:
            for future in futures:
                future.cancel()
            # a worker's set_num_threads(1) also set the count threads started later inherit; the main thread's own
            # stays (it is per thread), and this puts the shared one back
            torch.set_num_threads(main_threads)

    def _train(self, spec: FlatSpec, params: torch.Tensor, task: ClientTask) -> Update:
        model = getattr(self._copies, "model", None)
        if model is None:
            model = self._copies.model = copy.deepcopy(self._template)
        return client_update(model, spec, params, task.data, task.plan, task.task, task.local, seed_global_rng=False)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def draws_random_numbers(model: torch.nn.Module, task: ClientTask) -> bool:
    """Whether a training-mode forward pass of `model` on a few of the client's examples draws from torch's global
    generator (dropout, noise layers): the generator's state moves when it does."""
    probe = copy.deepcopy(model).train()
    examples = torch.arange(min(2, len(task.data)))
    with torch.random.fork_rng(), torch.no_grad():
        before = torch.get_rng_state()
        (task.task or Task()).forward(probe, task.data.inputs(examples))
        return not torch.equal(before, torch.get_rng_state())


def _refuse_random_models(model: torch.nn.Module, task: ClientTask) -> None:
    if draws_random_numbers(model, task):
        raise ValueError("fl.executor = 'threads': the model draws random numbers in training (dropout?), and "
                         "clients trained at once in one process cannot each seed torch's one global generator, so "
                         "runs would not repeat; use 'process_pool' or 'sequential'")
