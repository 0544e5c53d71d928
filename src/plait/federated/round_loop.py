"""The federated round loop, written once for every backend:

    select (among the clients the backend offers) → plan per client → the backend broadcasts, trains and collects
    (dropping stragglers) → aggregate (strategy, wrapped by central DP) → server optimizer → privacy accounting at the
    round's real sampling rate → evaluation (central test set, and on clients' held-out data)

A backend (`ClientBackend`) is where clients live: simulated in this process or a worker pool
(`backends/simulated.py`), or real processes over gRPC (`net/backend.py`). It says who may be selected, runs one
round's tasks, and runs federated evaluation; the loop does everything else, so a strategy, a privacy stage or a
codec is added once and works in simulation and over the network alike.

Randomness is derived from (seed, purpose, round, client), never from a running generator, so a run resumed from
its checkpoint after round r does exactly what the uninterrupted run would have done from round r+1, and the
network reproduces the simulation when the same clients are connected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from plait.core.finite import all_finite
from plait.core.flat import FlatSpec
from plait.federated.bounds import BoundedAggregator, Diverged, extend_history
from plait.federated.config import FLConfig
from plait.federated.device import model_device, on_device
from plait.federated.evaluate import OVERFLOWING_OUTPUT, evaluate, largest_output, test_set_record
from plait.federated.plan import TrainingPlan
from plait.federated.privacy.rounds import RoundPrivacy
from plait.federated.secagg.protocol import SecAggError
from plait.federated.seeds import client_seed, selection_rng
from plait.federated.selection import Population, Properties, Selection, requires, select_clients
from plait.federated.server_opt import build_server_opt
from plait.federated.strategy import Aggregator, TooFewUpdates, make_aggregator
from plait.federated.task import Inputs, Task

NO_NORMS = torch.zeros(0, dtype=torch.float64)


@dataclass(slots=True)
class ServerState:
    round: int                     # rounds finished so far
    params: torch.Tensor           # global weights, flat
    opt_state: dict[str, torch.Tensor]


@dataclass(slots=True)
class RoundTasks:
    """What a backend runs in one round: every selected client trains from `params` with its own plan."""
    round_idx: int
    selected: list[int]            # over-selection included
    target: int                    # reports wanted; the surplus is dropped
    quorum: int                    # fewer reports than this and the round is skipped
    plans: dict[int, TrainingPlan]
    params: torch.Tensor
    aggregator: Aggregator | None  # None: the backend aggregates itself (secure aggregation with real clients)


@dataclass(slots=True)
class Collected:
    """What a backend brought back from a round (it folded the updates into `RoundTasks.aggregator`)."""
    participants: int
    dropped: int
    loss_sum: float = 0.0          # Σ train_loss · n_k over the participants
    examples: int = 0
    mean: torch.Tensor | None = None   # the aggregate, when the backend computed it (secure aggregation)
    error: str = ""                    # why the backend could not aggregate: the round is skipped


@dataclass(slots=True)
class Evaluation:
    """One client's figures on its own held-out data."""
    client_id: int
    num_examples: int
    accuracy: float | None   # None for a task without accuracy (regression)
    loss: float


class ClientBackend(Protocol):
    aggregates_secagg: bool  # True: secure aggregation runs between real clients and the backend returns the mean

    def candidates(self, round_idx: int) -> Mapping[int, Properties] | Population:
        """The clients that may be selected this round (registered, or connected), with their device properties;
        or, for more than can be listed, a population that finds them one by one (selection.py)."""
        ...

    def declared_examples(self, client_ids: list[int]) -> dict[int, int]:
        """How many examples each of these clients said it holds before the round (the relative weight cap)."""
        ...

    def collect(self, tasks: RoundTasks, record: dict[str, Any]) -> Collected:
        """Broadcast, train, collect; adds what only it knows to `record` (bytes, simulated time, refusals)."""
        ...

    def evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> list[Evaluation]: ...

    def close(self) -> None: ...


class RoundLoop:
    """One round per call of `run_round(state)`; the state passed in is left as it was."""

    def __init__(self, config: FLConfig, backend: ClientBackend, *, model: torch.nn.Module, spec: FlatSpec,
                 initial_params: torch.Tensor, seed: int, num_clients: int,
                 test_set: tuple[Inputs, torch.Tensor] | None, task: Task | None = None):
        self.config, self.backend, self.seed, self.task = config, backend, seed, task or Task()
        self.model, self.spec, self.initial_params = model, spec, initial_params
        if test_set is not None:  # moved once to where the model evaluates (fl.device), not at every evaluation
            device = model_device(model)
            test_set = (on_device(test_set[0], device), test_set[1].to(device))
        self.test_set = test_set
        self.server_opt = build_server_opt(config.server_opt)
        self.eligible = requires(**config.eligibility)
        self.privacy = RoundPrivacy(config, seed, num_clients)

    def initial_state(self) -> ServerState:
        params = self.initial_params.clone()
        return ServerState(0, params, self.privacy.init_state(self.server_opt.init(params)))

    def checkpoint_extra(self) -> dict[str, Any]:
        """What the backend keeps in the run's checkpoint besides the state (simulated clients' residuals)."""
        extra = getattr(self.backend, "checkpoint_extra", None)
        return extra() if extra is not None else {}

    def load_checkpoint_extra(self, ckpt: dict[str, Any]) -> None:
        load = getattr(self.backend, "load_checkpoint_extra", None)
        if load is not None:
            load(ckpt)

    def close(self) -> None:
        self.backend.close()

    def run_round(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        cfg, round_idx = self.config, state.round + 1
        state = ServerState(state.round, state.params, {k: v.clone() for k, v in state.opt_state.items()})
        start = time.perf_counter()
        candidates = self.backend.candidates(round_idx)
        selection = select_clients(candidates, cfg.fraction, cfg.min_clients, cfg.over_selection, self.eligible,
                                   selection_rng(self.seed, round_idx))
        record: dict[str, Any] = {"round": round_idx, "lr": cfg.round_plan(round_idx).lr,
                                  "eligible": selection.num_eligible, "selected": len(selection.selected),
                                  "participants": 0, "dropped": 0, "bytes_down": 0, "bytes_up": 0}
        # q of the accountant: the share of the clients that could be selected that were (over-selection included)
        sample_rate = len(selection.selected) / selection.num_eligible if selection.selected else 1.0
        before = state
        if self.privacy.budget_spent(state.opt_state, sample_rate):
            record["skipped"] = record["stop"] = True  # the privacy budget is spent: no more releases
        elif not selection.selected:
            record["skipped"] = True  # fewer eligible clients than the quorum: the global model stays as it is
        else:
            state = self._train_and_aggregate(state, selection.selected, selection.target, record, sample_rate)
        self.privacy.record_epsilon(state.opt_state, record)
        state = ServerState(round_idx, state.params, state.opt_state)
        record.update(self._evaluate(state.params, round_idx, candidates, selection,
                                     final=bool(record.get("stop"))))
        if cfg.target_accuracy and record.get("test_accuracy", 0.0) >= cfg.target_accuracy:
            record["target_reached"] = record["stop"] = True  # the round count is the figure: rounds to target
        for key in ("test_loss", "fed_loss"):
            if key in record and not math.isfinite(record[key]):
                self._diverged(record, f"round {round_idx}: the {key} of the new global model is {record[key]}"
                               + self._nonfinite_loss_cause(state.params))
                state = ServerState(round_idx, before.params, before.opt_state)  # skip: the model stays as it was
        record["wall_s"] = time.perf_counter() - start
        return state, record

    def _nonfinite_loss_cause(self, params: torch.Tensor) -> str:
        """Who made a non-finite evaluation loss when the weights are finite: weights grown large enough to
        overflow the model's outputs (the rates), or, when its outputs are finite, the task's evaluation."""
        if not all_finite(params):
            return ""
        if self.test_set is not None:
            largest = largest_output(self.model, self.spec, params, self.test_set[0], self.task)
            if not largest < OVERFLOWING_OUTPUT:  # nan too
                outputs = "are not finite" if not math.isfinite(largest) else f"reach {largest:.3g}"
                return (f"; its weights are finite (the largest |w| is {float(params.abs().max()):.3g}) and the "
                        f"model's outputs {outputs}: they overflow")
        return "; its weights are finite, so the task's evaluation (fl.task's eval_sums) gave it"

    def _diverged(self, record: dict[str, Any], what: str) -> None:
        """Stop the run (fl.bounds.on_divergence = "stop"), or mark the round skipped."""
        if self.config.bounds.on_divergence == "stop":
            raise Diverged(f"{what} (fl.bounds.on_divergence = 'stop'; lower "
                           f"{self.config.server_opt.rates_to_lower()}, or set it to 'skip')")
        record["skipped"], record["diverged"] = True, what

    def _train_and_aggregate(self, state: ServerState, selected: list[int], target: int, record: dict[str, Any],
                             sample_rate: float) -> ServerState:
        cfg, round_idx = self.config, state.round + 1
        plan = cfg.round_plan(round_idx)
        plans = {cid: plan.for_client(client_seed(self.seed, round_idx, cid)) for cid in selected}
        aggregator = released = None
        if not (cfg.strategy.name == "secagg" and self.backend.aggregates_secagg):
            inner = make_aggregator(cfg.strategy, state.params.numel(), seed=self.seed, round_idx=round_idx)
            released = self.privacy.wrap(inner, state.opt_state, round_idx)
            try:
                if hasattr(released, "begin"):  # e.g. simulated secure aggregation sets up keys with the selected
                    released.begin(list(selected))
            except SecAggError as err:  # e.g. too few clients selected to hide any one of them
                record["skipped"], record["aggregation_error"] = True, str(err)
                return state
            aggregator = released
            if cfg.strategy.name != "secagg":  # masked updates cannot be checked (bounds.py)
                # the weight cap comes from the whole cohort's declarations, fixed before any update arrives
                declared = self.backend.declared_examples(selected) if cfg.bounds.examples_factor else {}
                aggregator = BoundedAggregator(released, cfg.bounds, state.opt_state.get("norm_history", NO_NORMS),
                                               declared)
        tasks = RoundTasks(round_idx, selected, target, cfg.min_clients, plans, state.params, aggregator)
        got = self.backend.collect(tasks, record)
        record["participants"], record["dropped"] = got.participants, got.dropped
        if isinstance(aggregator, BoundedAggregator):  # weights capped, norms clipped (refusals: the backend's)
            record.update({f"capped_{reason}": n for reason, n in aggregator.capped.items() if n})
        if got.participants:
            record["train_loss"] = got.loss_sum / max(got.examples, 1)
        if got.error:
            record["skipped"], record["aggregation_error"] = True, got.error
            return state
        if got.participants < cfg.min_clients:
            record["skipped"] = True  # quorum not reached: the global model stays as it is
            return state
        mean = got.mean
        if mean is None:
            assert aggregator is not None  # only a backend that aggregates itself leaves it out, and it sets the mean
            try:
                mean = aggregator.result()
            except (SecAggError, TooFewUpdates) as err:  # e.g. too many dropouts: this round releases nothing
                record["skipped"], record["aggregation_error"] = True, str(err)
                return state
        if not all_finite(mean):
            self._diverged(record, f"round {round_idx}: the aggregate of the clients' updates is not finite")
            return state
        if released is not None and hasattr(released, "traffic"):  # simulated secure aggregation: its messages
            traffic = released.traffic()
            record["bytes_up"] = traffic["bytes_up"]
            record["bytes_down"] += traffic["bytes_down"]
        params, opt_state = self.server_opt.apply(state.params, mean, state.opt_state)
        trained = self.spec.num_params
        if trained < params.numel():
            # federated buffers (BatchNorm's running statistics) follow the parameters and take the clients' mean,
            # as in FedAvg: a server optimizer's step is for what gradients trained (an adaptive one would move a
            # running variance by about its rate whatever its size, below 0 at worst, and momentum overshoot it)
            params[trained:] = state.params[trained:] + mean[trained:]
        if not all_finite(params):
            self._diverged(record, f"round {round_idx}: the server optimizer made the global model non-finite")
            return state
        if isinstance(aggregator, BoundedAggregator):
            opt_state["norm_history"] = extend_history(opt_state.get("norm_history", NO_NORMS),
                                                       aggregator.accepted_norms)
        self.privacy.after_release(released, opt_state, record, sample_rate)
        return ServerState(state.round, params, opt_state)

    def _evaluate(self, params: torch.Tensor, round_idx: int, candidates: Mapping[int, Properties] | Population,
                  selection: Selection, final: bool) -> dict[str, float]:
        cfg, out = self.config, dict[str, float]()
        last = final or round_idx == cfg.rounds
        if self.test_set is not None and (last or (cfg.eval_every and round_idx % cfg.eval_every == 0)):
            out.update(test_set_record(evaluate(self.model, self.spec, params, *self.test_set, task=self.task)))
        if cfg.federated_eval_every and (last or round_idx % cfg.federated_eval_every == 0):
            # every candidate; from a population too large to list, the round's cohort (a uniform sample of it)
            ids = sorted(candidates) if isinstance(candidates, Mapping) else selection.selected
            out.update(self.federated_evaluate(params, ids, round_idx))
        return out

    def federated_evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> dict[str, float]:
        """Accuracy and loss on the clients' own held-out data, weighted by its size."""
        results = [r for r in self.backend.evaluate(params, client_ids, round_idx) if r.num_examples]
        total = sum(r.num_examples for r in results)
        if not total:  # e.g. no client answered in time: nothing to report this round
            return {"fed_clients": 0}
        out = {"fed_loss": sum(r.loss * r.num_examples for r in results) / total, "fed_clients": len(results)}
        if all(r.accuracy is not None for r in results):
            out["fed_accuracy"] = sum((r.accuracy or 0.0) * r.num_examples for r in results) / total
        return out

