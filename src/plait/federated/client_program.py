"""The client program: what a client runs each round, the same in simulation and behind `plait fl client`.

    train (`client_update`) → clip + local-DP noise → compress (error feedback kept per client)

Secure aggregation's masking follows, in the secagg client half (`secagg/client.py`), which the simulated secure
aggregator and the network client both drive. A simulated worker pool trains in other processes and hands the
update back for `finish`, so that error-feedback residuals stay with the run's one `ClientProgram` (and its
checkpoint).
"""

from __future__ import annotations

import torch

from plait.core.compress import Encoded
from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, Update, client_update
from plait.federated.config import FLConfig
from plait.federated.pipeline import ClientStages
from plait.federated.plan import TrainingPlan
from plait.federated.task import Task


class ClientProgram:
    def __init__(self, fl: FLConfig, seed: int):
        self.stages = ClientStages(fl.privacy, fl.compression, seed)

    def train(self, model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
              plan: TrainingPlan, task: Task | None = None,
              local: tuple[torch.Tensor, FlatSpec] | None = None) -> Update:
        return client_update(model, spec, params, data, plan, task, local)

    def finish(self, client_id: int, delta: torch.Tensor, round_idx: int) -> Encoded:
        """The update pipeline's client half on a trained delta: what goes on the wire."""
        return self.stages.encode(client_id, delta, round_idx)

    def decode(self, client_id: int, encoded: Encoded) -> torch.Tensor:
        """The server's inverse of `finish`'s compression (noise and clipping stay)."""
        return self.stages.decode(client_id, encoded)
