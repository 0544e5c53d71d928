"""What federated learning must beat, and what it approaches (the lecture: FL must beat training alone, or it is
not worth doing):

- local-only: each client trains alone, from the same initial model, on its own data, for the compute it would
  spend in the federated run (rounds · C · E epochs in expectation); the mean and the 10th/90th percentile of their
  test accuracy;
- centralised: one model on the union of the clients' data, for the same total compute (rounds · C · E epochs).

Both use the run's own model, task, plan (batch size, lr, momentum) and test set.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from plait.data.federated import concat_labelled
from plait.data.user import Labelled
from plait.federated.client_update import ClientData, client_update
from plait.federated.evaluate import evaluate
from plait.federated.seeds import CENTRAL_BASELINE, LOCAL_BASELINE, derive_seed
from plait.federated.server import FederatedServer
from plait.federated.weights import local_buffer_state


def equivalent_epochs(server: FederatedServer, rounds: int) -> int:
    """Epochs one client trains in `rounds` federated rounds, in expectation: rounds · C · E (at least 1)."""
    cfg = server.config
    return max(1, round(rounds * cfg.fraction * cfg.plan.epochs))


def _trained_accuracy(server: FederatedServer, data: ClientData, epochs: int, seed: int) -> float:
    plan = replace(server.config.plan, epochs=epochs, max_steps=0, seed=seed)
    start = server.initial_params
    local = local_buffer_state(server.model) if server.config.buffers == "local" else None
    update = client_update(server.model, server.spec, start, data, plan, server.task, local)
    test_x, test_y = server.data.test_x, server.data.test_y
    return evaluate(server.model, server.spec, start + update.delta, test_x, test_y, task=server.task)["accuracy"]


def local_only(server: FederatedServer, rounds: int) -> dict[str, float]:
    epochs = equivalent_epochs(server, rounds)
    accuracies = [_trained_accuracy(server, ClientData(*server.data.client_train(cid)), epochs,
                                    derive_seed(server.seed, LOCAL_BASELINE, cid))
                  for cid in range(server.data.num_clients)]
    return {"local_epochs": epochs, "local_accuracy_mean": float(np.mean(accuracies)),
            "local_accuracy_p10": float(np.percentile(accuracies, 10)),
            "local_accuracy_p90": float(np.percentile(accuracies, 90))}


def centralised(server: FederatedServer, rounds: int) -> dict[str, float]:
    epochs = equivalent_epochs(server, rounds)
    union = concat_labelled([Labelled(*server.data.client_train(cid)) for cid in range(server.data.num_clients)])
    seed = derive_seed(server.seed, CENTRAL_BASELINE)
    return {"central_epochs": epochs,
            "central_accuracy": _trained_accuracy(server, ClientData(union.x, union.y), epochs, seed)}
