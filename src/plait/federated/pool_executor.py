"""Process-pool client execution: persistent worker processes, one torch thread each, run `client_update`.

Small models are overhead-bound on one core, so two single-threaded workers on two cores do about twice the
clients per second of one process. Tensors cross the process boundary through shared memory
(torch.multiprocessing), not through serialised bytes; the global weights are shared once per round. With a GPU
device (fl.device) each worker holds its model there and sends its update back on the CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import torch
import torch.multiprocessing as mp

from plait.core.flat import FlatSpec
from plait.federated.client_update import Update, client_update
from plait.federated.device import CPU, model_device
from plait.federated.executor import ClientTask

_worker_model: torch.nn.Module | None = None


def _init_worker(model: torch.nn.Module, threads: int, device: torch.device) -> None:
    global _worker_model
    torch.set_num_threads(threads)
    _worker_model = model.to(device)


def _run_task(args) -> tuple[int, Update | str]:
    spec, params, task = args
    try:
        update = client_update(_worker_model, spec, params, task.data, task.plan, task.task, task.local)
        return task.client_id, update.cpu()  # through shared memory: CUDA tensors would need the GPU's IPC
    except Exception as err:  # returned, not raised: the parent names the client
        return task.client_id, f"{type(err).__name__}: {err}"


class ProcessPoolExecutor:
    """`num_workers` persistent processes (default: one per core) training on `device` (default: where `model`
    lives). The model is sent once, at start, from the CPU."""

    def __init__(self, model: torch.nn.Module, num_workers: int = 0, threads_per_worker: int = 1,
                 device: torch.device | None = None):
        self.num_workers = num_workers or max(1, os.cpu_count() or 1)
        self.device = device or model_device(model)
        if self.device != CPU or model_device(model) != CPU:
            # The workers' copy is pickled now and again if a worker is replaced: it must hold no CUDA tensors, and
            # the caller's module may move to the GPU later (the server evaluates there).
            model = copy.deepcopy(model).cpu()
        ctx = mp.get_context("spawn")
        self._pool = ctx.Pool(self.num_workers, initializer=_init_worker,
                              initargs=(model, threads_per_worker, self.device))

    def run(self, model, spec: FlatSpec, global_params: torch.Tensor,
            tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Update]]:
        shared = global_params.detach().clone().share_memory_()
        by_id = {task.client_id: task for task in tasks}
        # imap, not imap_unordered: updates are folded in task order, so a run gives the same bits as the sequential
        # backend and as itself (float sums depend on order); each still arrives as soon as its turn comes.
        for client_id, result in self._pool.imap(_run_task, [(spec, shared, t) for t in tasks]):
            if isinstance(result, str):
                raise RuntimeError(f"client {client_id}: local training failed: {result}")
            yield by_id[client_id], result

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
