"""The simulated federation: the one round loop (`round_loop.py`) over simulated clients (`backends/simulated.py`).

    server = FederatedServer(fl_config, model, data, executor, seed)
    state, record = server.run_round(server.initial_state())

Over the network the same loop runs with the gRPC backend (`net/backend.py`); nothing here is specific to
simulation but the backend it is built with.
"""

from __future__ import annotations

import torch

from plait.data.lazy import ClientSets
from plait.federated.backends.simulated import SimulatedBackend
from plait.federated.config import FLConfig
from plait.federated.device import CPU
from plait.federated.executor import ClientExecutor
from plait.federated.round_loop import RoundLoop, ServerState
from plait.federated.seeds import client_seed
from plait.federated.task import Task
from plait.federated.weights import flat_model_state

__all__ = ["FederatedServer", "ServerState", "client_seed"]


class FederatedServer(RoundLoop):
    def __init__(self, config: FLConfig, model: torch.nn.Module, data: ClientSets, executor: ClientExecutor,
                 seed: int, task: Task | None = None, device: torch.device = CPU):
        """`model` arrives on the CPU; the server moves it to `device` (fl.device), where the sequential clients
        train and the test set is evaluated. The global state stays on the CPU."""
        initial_params, spec = flat_model_state(model, buffers=config.buffers == "federated")
        kind = SimulatedBackend
        if config.executor == "distributed":  # the same clients, spread over torch.distributed ranks
            from plait.federated.backends.distributed import DistributedBackend

            kind = DistributedBackend
        backend = kind(config, model, spec, data, executor, seed, initial_params.numel(), task)
        model.to(device)  # after the backend took the initial (CPU) copy of each client's own buffers
        test_set = (data.test_x, data.test_y) if len(data.test_y) else None
        super().__init__(config, backend, model=model, spec=spec, initial_params=initial_params, seed=seed,
                         num_clients=data.num_clients, test_set=test_set, task=task)
        self.data = data
        if config.strategy.name == "secagg" and config.strategy.weighting == "examples":
            config.strategy.secagg.check_weights(max(data.num_examples(c) for c in range(data.num_clients)))

    @property
    def executor(self) -> ClientExecutor:
        return self.backend.executor

    @executor.setter
    def executor(self, executor: ClientExecutor) -> None:
        self.backend.executor = executor

    @property
    def devices(self):
        return self.backend.devices

    @property
    def stages(self):
        return self.backend.program.stages
