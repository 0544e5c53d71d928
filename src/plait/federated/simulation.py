"""A federated simulation built from its config: the data, the model, the simulated clients' executor and the round
loop (or the gossip runner). The driver runs its rounds in a run directory (`plait.experiment.runs.fl_simulation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from plait.data.federated import federated_from_user_data, load_federated
from plait.data.user import user_data_from
from plait.federated.components import build_model, build_task, check_model_fits
from plait.federated.config import FederatedRunConfig
from plait.federated.device import local_rank, rank_device, resolve_device
from plait.federated.executor import ClientExecutor, SequentialExecutor
from plait.federated.server import FederatedServer
from plait.federated.task import Task

if TYPE_CHECKING:
    from plait.federated.gossip import GossipRunner

AUTO_SAMPLE = 1000  # fl.executor = "auto" measures a median-sized client among at most this many


def client_device(config: FederatedRunConfig) -> torch.device:
    """Where the simulated clients train and the server evaluates (fl.device); a torchrun rank takes its own GPU,
    cuda:LOCAL_RANK. ConfigError naming fl.device for "cuda" without a GPU."""
    if config.fl.executor == "distributed":
        return rank_device(config.fl.device, "fl.device")
    return resolve_device(config.fl.device, "fl.device")


def build_executor(config: FederatedRunConfig, model: torch.nn.Module,
                   device: torch.device | None = None) -> ClientExecutor:
    """The clients' executor; `device`: where pool workers train (default: where `model` lives). The sequential
    executor trains where the model lives."""
    if config.fl.executor == "threads":
        from plait.federated.thread_executor import ThreadPoolExecutor

        return ThreadPoolExecutor(model, config.fl.workers, device=device)
    if config.fl.executor == "process_pool":
        from plait.federated.pool_executor import ProcessPoolExecutor

        return ProcessPoolExecutor(model, config.fl.workers, threads_per_worker=config.fl.worker_threads or 1,
                                   device=device, start=config.fl.pool_start)
    return SequentialExecutor(train_threads=config.fl.worker_threads)


def _choose_executor(config: FederatedRunConfig, model: torch.nn.Module, data: Any, task: Task,
                     device: torch.device) -> None:
    """Measure, pick, say why, and write the choice into the config (the run's config.toml records it)."""
    import logging

    from plait.federated.backends.auto import choose_executor, training_threads
    from plait.federated.client_update import ClientData
    from plait.federated.pool_executor import start_method
    from plait.federated.seeds import client_seed
    from plait.federated.selection import target_clients
    from plait.federated.weights import flat_model_state

    if device.type == "cuda":  # the timings below are the CPU's; a pool's processes would only share the one GPU
        why = f"clients train on {device}: one process keeps the GPU busy"
        logging.getLogger("plait.fl").warning("fl.executor = 'auto' chose 'sequential': %s", why)
        config.fl.executor = "sequential"
        return
    params, spec = flat_model_state(model, buffers=config.fl.buffers == "federated")
    # the median-sized client, among at most AUTO_SAMPLE spread over the ids (a million clients: a thousand asked)
    ids = range(data.num_clients) if data.num_clients <= AUTO_SAMPLE else \
        sorted(set(np.linspace(0, data.num_clients - 1, AUTO_SAMPLE).astype(int).tolist()))
    typical = sorted(ids, key=data.num_examples)[len(ids) // 2]
    plan = config.fl.plan.for_client(client_seed(config.run.seed, 0, typical))
    client = ClientData(*data.client_train(typical))
    pool_start = start_method(config.fl.pool_start, device, config.fl.worker_threads or 1)
    chosen, why = choose_executor(model, spec, params, client, plan, task, rounds=config.fl.rounds,
                                  clients_per_round=target_clients(config.fl.fraction, config.fl.min_clients,
                                                                   data.num_clients), pool_start=pool_start)
    if chosen == "sequential" and not config.fl.worker_threads:
        config.fl.worker_threads, said = training_threads(model, spec, params, client, plan, task)
        why += f"; {said}"
    logging.getLogger("plait.fl").warning("fl.executor = 'auto' chose %r: %s", chosen, why)
    config.fl.executor = chosen


def build_server(config: FederatedRunConfig, executor: ClientExecutor | None = None, *,
                 model: Callable[[], torch.nn.Module] | None = None, data: Any = None,
                 task: Task | None = None) -> FederatedServer | GossipRunner:
    """The server with its data, model and client executor (sequential unless `fl.executor` says otherwise), or,
    with `fl.gossip.topology` set, the server-less gossip runner, which has the same interface.

    From Python, `model` (a function returning a fresh module), `data` (what a `data.source` loader may return:
    (x, y), a Dataset, per-client sets) and `task` stand in for the config's `model.factory`, `data.source` and
    `fl.task`."""
    if isinstance(model, torch.nn.Module):  # calling a module runs its forward: say what to pass instead
        raise ValueError(f"model= takes a function that returns a fresh module (make_net, or lambda: "
                         f"{type(model).__name__}(...)), not a {type(model).__name__} already made")
    if isinstance(task, type):
        raise ValueError(f"task= takes a task object ({task.__name__}()), not the class {task.__name__}")
    device = client_device(config)  # "cuda" without a GPU fails here, before any data is loaded
    if device.type == "cuda" and config.fl.executor == "distributed":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if data is not None:
        fed = federated_from_user_data(config.data, user_data_from(data, "data"))
    else:
        fed = load_federated(config.data)
    torch.manual_seed(config.run.seed)  # the initial global model
    net = model() if model is not None else build_model(config.model, fed.num_classes)
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"model: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    task = task or build_task(config.fl)
    which = ("the model passed to run_federated" if model is not None else f"model.factory = {config.model.factory!r}"
             if config.model.factory else f"model.name = {config.model.name!r}")
    check_model_fits(task, net, *fed.client_train(0), fed.num_classes, which)
    model, data = net, fed
    if config.fl.gossip.enabled:  # decentralised: no server, nodes average with their neighbours
        from plait.federated.gossip import GossipRunner

        return GossipRunner(config.fl, model, data, config.run.seed, task, device)
    if config.fl.executor == "auto" and executor is None:
        _choose_executor(config, model, data, task, device)
    executor = executor or build_executor(config, model, device)  # the pool gets the model from the CPU
    try:
        return FederatedServer(config.fl, model, data, executor, config.run.seed, task, device)
    except Exception:
        executor.close()  # a worker pool must not outlive a server that failed to start
        raise


def distributed_rank(device_setting: str = "auto") -> int:
    """This process's rank under `fl.executor = 'distributed'`, joining torchrun's process group first if need be:
    NCCL when every rank of the node has its own GPU and `fl.device` (`device_setting`) allows one, else gloo."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError("fl.executor = 'distributed' runs under torchrun: "
                             "torchrun --nproc-per-node N -m plait.cli run CONFIG")
        device = rank_device(device_setting, "fl.device")
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank() + 1))
        own_gpus = device.type == "cuda" and ranks_here <= torch.cuda.device_count()
        dist.init_process_group("nccl" if own_gpus else "gloo")
    return dist.get_rank()
