"""What federated learning must beat, and what it approaches (the lecture: FL must beat training alone, or it is
not worth doing):

- local-only: each client trains alone, from the same initial model, on its own data, for the compute it would
  spend in the federated run (rounds · q · E epochs in expectation, q the share of the clients a round trains: C,
  or the quorum's share when that is more); the mean and the 10th/90th percentile of their test accuracy;
- centralised: one model on the union of the clients' data, for the same total compute (rounds · q · E epochs).

When the plan caps a client's steps a round (`fl.plan.max_steps`), the compute is counted in steps instead: each
client alone takes rounds · q · its steps a round, and the central model the sum of those over the clients, in
batches of the plan's size.

Both use the run's own model, task, plan (batch size, lr, momentum) and test set; the central model takes
`fl.central_lr` instead when it is set (a rate FL's few local epochs between averages hold can make one model
diverge over all the central epochs; the paper tuned each rate). The clients alone train on the
run's executor (a worker pool trains several at once, each converting its own rows) and give the same bits on
every executor. `fl.baselines = true` runs both after a simulated run (experiment/runs/fl_baselines.py); a
benchmark's reference run prints `benchmark_line(name, against_baselines(server, rounds, accuracy))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace

import numpy as np
import torch

from plait.core.flat import FlatSpec
from plait.data.federated import concat_labelled
from plait.data.user import Labelled, take
from plait.federated.client_update import ClientData, Update, client_update
from plait.federated.evaluate import evaluate
from plait.federated.executor import ClientTask
from plait.federated.plan import TrainingPlan
from plait.federated.seeds import CENTRAL_BASELINE, LOCAL_BASELINE, derive_seed
from plait.federated.selection import target_clients
from plait.federated.server import FederatedServer
from plait.federated.weights import local_buffer_state

CLIENTS_AT_ONCE = 16  # clients handed to the executor together, their updates held until evaluated


def round_share(server: FederatedServer) -> float:
    """The share of the clients a round trains: C, or the quorum's share when that is more (selection's target)."""
    num_clients = server.data.num_clients
    return target_clients(server.config.fraction, server.config.min_clients, num_clients) / num_clients


def _half_up(value: float) -> int:
    return max(1, math.floor(value + 0.5 + 1e-9))  # a half up: 2.5 is 3; at least 1


def equivalent_epochs(server: FederatedServer, rounds: int) -> int:
    """Epochs one client trains in `rounds` federated rounds, in expectation: rounds · q · E (q: round_share), to
    the nearest whole epoch (a half up), at least 1. With a step cap, the whole epochs the capped steps reach."""
    if server.config.plan.max_steps:
        return max(_capped_epochs(server, rounds, server.data.num_examples(cid))
                   for cid in range(server.data.num_clients))
    return _half_up(rounds * round_share(server) * server.config.plan.epochs)


def _epoch_steps(plan: TrainingPlan, num_examples: int) -> int:
    """The steps of one whole epoch over `num_examples` under the plan's batch size (no cap)."""
    return replace(plan, epochs=1, max_steps=0).num_steps(num_examples)


def _capped_epochs(server: FederatedServer, rounds: int, num_examples: int) -> int:
    """The whole epochs a client of `num_examples` needs for its capped steps (capped_steps)."""
    return math.ceil(capped_steps(server, rounds, num_examples) / _epoch_steps(server.config.plan, num_examples))


def capped_steps(server: FederatedServer, rounds: int, num_examples: int) -> int:
    """With fl.plan.max_steps: the steps a client of `num_examples` takes in `rounds` rounds, in expectation."""
    return _half_up(rounds * round_share(server) * server.config.plan.num_steps(num_examples))


def baseline_plan(server: FederatedServer, rounds: int, seed: int, num_examples: int | None = None) -> TrainingPlan:
    """The clients' plan stretched to `rounds` rounds' compute, with its own seed: whole epochs, or, when the plan
    caps a client's steps a round, the steps a client of `num_examples` takes over the rounds."""
    plan = server.config.plan
    if plan.max_steps and num_examples is not None:  # its own epochs: the first steps are the same whatever comes after
        return replace(plan, epochs=_capped_epochs(server, rounds, num_examples),
                       max_steps=capped_steps(server, rounds, num_examples), seed=seed)
    return replace(plan, epochs=equivalent_epochs(server, rounds), max_steps=0, seed=seed)


def central_steps(server: FederatedServer, rounds: int) -> int:
    """With fl.plan.max_steps: the central model's steps, those of every client alone summed (the same examples
    seen, in batches of the plan's size); 0 without a cap (whole epochs)."""
    if not server.config.plan.max_steps:
        return 0
    return sum(capped_steps(server, rounds, server.data.num_examples(cid)) for cid in range(server.data.num_clients))


def central_lr(server: FederatedServer) -> float:
    """The central model's learning rate: fl.central_lr, or the clients' plan.lr when that is 0."""
    return server.config.central_lr or server.config.plan.lr


def _union_steps_per_epoch(server: FederatedServer) -> int:
    examples = sum(server.data.num_examples(cid) for cid in range(server.data.num_clients))
    return _epoch_steps(server.config.plan, examples)


def central_epochs(server: FederatedServer, rounds: int) -> int:
    """The central model's epochs over the union: the run's equivalent ones, or those its capped steps reach."""
    steps = central_steps(server, rounds)
    return math.ceil(steps / _union_steps_per_epoch(server)) if steps else equivalent_epochs(server, rounds)


def _local_buffers(server: FederatedServer) -> tuple[torch.Tensor, FlatSpec] | None:
    """The initial own buffers of a client (fl.buffers = "local": BatchNorm statistics each client keeps), as the
    rounds start them: the simulated backend's CPU copy, taken before the model moved to its device."""
    if server.config.buffers != "local":
        return None
    initial = getattr(server.backend, "initial_local", None)
    return initial if initial is not None else local_buffer_state(server.model)


def check_baselines(server: FederatedServer) -> None:
    """Fail before a run whose baselines could not be scored: they compare test accuracy."""
    test_x, test_y = server.data.test_x, server.data.test_y
    if not len(test_y):
        raise ValueError("fl.baselines compares test accuracy, and the data has no test set (give it one: test_x and "
                         "test_y; or set fl.baselines = false)")
    first = evaluate(server.model, server.spec, server.initial_params, take(test_x, slice(0, 2)), test_y[:2],
                     task=server.task, local=_local_buffers(server))
    if "accuracy" not in first:
        raise ValueError(f"fl.baselines compares test accuracy, and the task ({type(server.task).__name__}) reports "
                         f"none (it reports {sorted(first)}; set fl.baselines = false, or give the task an "
                         "'accuracy' in its eval_sums)")


def accuracy_of(server: FederatedServer, params: torch.Tensor,
                local: tuple[torch.Tensor, FlatSpec] | None) -> float:
    """Test accuracy of weights `params` with own buffers `local` (when the run keeps them per client)."""
    test_x, test_y = server.data.test_x, server.data.test_y
    return evaluate(server.model, server.spec, params, test_x, test_y, task=server.task, local=local)["accuracy"]


def _trained_accuracy(server: FederatedServer, start: torch.Tensor, update: Update,
                      local: tuple[torch.Tensor, FlatSpec] | None) -> float:
    """Test accuracy of `start` plus the update, with the buffers the training left (when they are its own)."""
    if local is not None and update.local_buffers is not None:
        local = (update.local_buffers, local[1])
    return accuracy_of(server, start + update.delta, local)


def local_accuracies(server: FederatedServer, rounds: int, skip: Collection[int] = ()) -> Iterator[tuple[int, float]]:
    """(client, test accuracy) of each client but those in `skip` trained alone for the run's compute, in client
    order, each as soon as it is known (a caller can keep them and skip them when it starts again)."""
    start, local = server.initial_params, _local_buffers(server)
    todo = [cid for cid in range(server.data.num_clients) if cid not in skip]
    for first in range(0, len(todo), CLIENTS_AT_ONCE):
        tasks = []
        for cid in todo[first:first + CLIENTS_AT_ONCE]:
            plan = baseline_plan(server, rounds, derive_seed(server.seed, LOCAL_BASELINE, cid),
                                 server.data.num_examples(cid))
            tasks.append(ClientTask(cid, plan, ClientData(*server.data.client_train_raw(cid)), server.task, local))
        # evaluated once the executor is done with the chunk: inside its loop, torch runs on its training threads
        # (one, for a pool whose workers hold the cores), and the test set's evaluation would get no more
        trained = list(server.executor.run(server.model, server.spec, start, tasks))
        for task, update in trained:
            yield task.client_id, _trained_accuracy(server, start, update, local)


def local_summary(accuracies: list[float], epochs: int) -> dict[str, float]:
    return {"local_epochs": epochs, "local_accuracy_mean": float(np.mean(accuracies)),
            "local_accuracy_p10": float(np.percentile(accuracies, 10)),
            "local_accuracy_p90": float(np.percentile(accuracies, 90))}


def local_only(server: FederatedServer, rounds: int) -> dict[str, float]:
    accuracies = [accuracy for _, accuracy in local_accuracies(server, rounds)]
    return local_summary(accuracies, equivalent_epochs(server, rounds))


def central_model(server: FederatedServer, rounds: int, params: torch.Tensor | None = None,
                  buffers: torch.Tensor | None = None, done: int = 0,
                  after_epoch: Callable[[int, torch.Tensor, torch.Tensor | None, float], object] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """One model on the union of the clients' data at the run's compute: its (weights, own buffers, the epoch whose
    training loss was not finite or None) trained an
    epoch at a time after the first `done` (from `params` and, with fl.buffers = "local", its own `buffers`; by
    default the run's initial ones), `after_epoch(epochs done, weights, buffers, the epoch's mean training loss)`
    called after each; an epoch whose loss is not finite (the model diverged) is the last. Each epoch
    shuffles with its own seed, so a caller that saves them and starts again at an epoch gets the same bits as one
    that never stopped (an hour of a CNN's epochs is not lost whole to a stop). The plan's momentum starts afresh
    each epoch, as it would after such a stop."""
    initial = _local_buffers(server)
    union = concat_labelled([Labelled(*server.data.client_train(cid)) for cid in range(server.data.num_clients)])
    data = ClientData(union.x, union.y)
    if params is None:
        params, buffers = server.initial_params, initial[0] if initial is not None else None
    params = params.to(server.initial_params.device)  # weights saved by a stopped run come back on the CPU
    total, per_epoch = central_steps(server, rounds), _union_steps_per_epoch(server)
    for epoch in range(done, central_epochs(server, rounds)):
        left = total - epoch * per_epoch  # with a step cap, the last epoch takes only the steps left
        plan = replace(baseline_plan(server, rounds, derive_seed(server.seed, CENTRAL_BASELINE, epoch)), epochs=1,
                       max_steps=left if total and left < per_epoch else 0, lr=central_lr(server))
        local = (buffers, initial[1]) if initial is not None and buffers is not None else None
        update = client_update(server.model, server.spec, params, data, plan, server.task, local)
        params, buffers = params + update.delta, update.local_buffers
        loss = update.metrics["train_loss"]
        if after_epoch is not None:
            after_epoch(epoch + 1, params, buffers, loss)
        if not math.isfinite(loss):  # NaN weights: further epochs change nothing
            return params, buffers, epoch + 1
    return params, buffers, None


def central_accuracy(server: FederatedServer, params: torch.Tensor, buffers: torch.Tensor | None) -> float:
    """Test accuracy of the central model's weights `params` and own `buffers` (central_model's)."""
    initial = _local_buffers(server)
    return accuracy_of(server, params, (buffers, initial[1]) if initial is not None and buffers is not None else None)


def centralised(server: FederatedServer, rounds: int) -> dict[str, float]:
    """One model on all the data at `rounds` rounds' compute: its epochs, test accuracy, and the epoch at which its
    training loss stopped being finite (`central_diverged_at_epoch`, when it did)."""
    params, buffers, diverged = central_model(server, rounds)
    return {"central_epochs": central_epochs(server, rounds), "central_accuracy": central_accuracy(server, params,
                                                                                                    buffers),
            **({"central_diverged_at_epoch": diverged} if diverged else {})}


def compared(fl_accuracy: float | None, baselines: dict[str, float]) -> dict[str, float]:
    """The baselines with FL's final test accuracy beside them: `beats_local_by` (FL minus the clients' mean) and
    `short_of_central_by` (one model on all the data minus FL; negative when FL ends above it)."""
    if fl_accuracy is None:
        return dict(baselines)
    return {**baselines, "fl_accuracy": fl_accuracy,
            "beats_local_by": fl_accuracy - baselines["local_accuracy_mean"],
            "short_of_central_by": baselines["central_accuracy"] - fl_accuracy}


def against_baselines(server: FederatedServer, rounds: int, fl_accuracy: float | None) -> dict[str, float]:
    """Both baselines at the compute of `rounds` rounds, compared with FL's `fl_accuracy` after them."""
    return compared(fl_accuracy, {**local_only(server, rounds), **centralised(server, rounds)})


def benchmark_line(benchmark: str, summary: dict[str, float]) -> dict[str, object]:
    """A benchmark's JSON line for a run against its baselines: FL's accuracy against each client alone's mean."""
    fl, alone = summary["fl_accuracy"], summary["local_accuracy_mean"]
    return {"benchmark": benchmark, "metric": "fl_accuracy_vs_each_client_alone", "plait": round(fl, 4),
            "reference": round(alone, 4), "ratio": round(fl / alone, 3) if alone else None,
            **{k: round(v, 4) for k, v in summary.items() if k not in ("fl_accuracy", "local_accuracy_mean")},
            "goal": "FL beats each client alone (beats_local_by > 0) and approaches one model on all the data"}
