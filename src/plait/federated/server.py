"""The federated server's round: select → broadcast plan → local training → collect (drop stragglers) →
aggregate → server optimizer → evaluate. State lives in `ServerState`; one call runs one round.

Between local training and the server optimizer runs the update pipeline of `plait.federated.pipeline`: simulated
attackers, local DP, compression (bytes_up counts the compressed payload), then aggregation wrapped by central DP.
With DP on, the round's ε (dp-accounting, RDP) is in the metrics; a round that would overspend
`privacy.epsilon_budget` is not run: its record says `stop = true` and the model no longer changes.

Randomness is derived from (seed, round, client), never from a running generator, so a run resumed from its
checkpoint after round r does exactly what the uninterrupted run would have done from round r+1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plait.core.flat import flat_params
from plait.data.federated import FederatedData
from plait.federated.attacks import attacker_ids, flip_labels, poison_delta
from plait.federated.client_update import ClientData, Update
from plait.federated.config import FLConfig
from plait.federated.evaluate import evaluate
from plait.federated.executor import ClientExecutor, ClientTask
from plait.federated.pipeline import ClientStages
from plait.federated.privacy.rounds import RoundPrivacy
from plait.federated.secagg.protocol import SecAggError
from plait.federated.seeds import client_seed, stage_seed
from plait.federated.selection import requires, select_clients
from plait.federated.server_opt import build_server_opt
from plait.federated.strategy import Aggregator, TooFewUpdates, make_aggregator
from plait.federated.stragglers import DevicePool, split_on_time


@dataclass(slots=True)
class ServerState:
    round: int                     # rounds finished so far
    params: torch.Tensor           # global weights, flat
    opt_state: dict[str, torch.Tensor]


class FederatedServer:
    def __init__(self, config: FLConfig, model: torch.nn.Module, data: FederatedData, executor: ClientExecutor,
                 seed: int):
        self.config, self.model, self.data, self.executor, self.seed = config, model, data, executor, seed
        self.initial_params, self.spec = flat_params(model)
        self.server_opt = build_server_opt(config.server_opt)
        self.devices = DevicePool(config.devices, data.num_clients, seed)
        self.eligible = requires(**config.eligibility)
        self.model_bytes = self.initial_params.numel() * self.initial_params.element_size()
        self.stages = ClientStages(config.privacy, config.compression, seed)
        # what one compressed update costs on the uplink, for the simulated devices' transfer times
        self.upload_bytes = self.stages.codec.encode(torch.ones_like(self.initial_params)).nbytes
        self.attackers = attacker_ids(config.attack, data.num_clients)
        self.privacy = RoundPrivacy(config, seed, data.num_clients)
        if config.strategy.name == "secagg" and config.strategy.weighting == "examples":
            config.strategy.secagg.check_weights(max(data.num_examples(c) for c in range(data.num_clients)))

    def initial_state(self) -> ServerState:
        params = self.initial_params.clone()
        return ServerState(0, params, self.privacy.init_state(self.server_opt.init(params)))

    def run_round(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One round from `state`, which is left as it was (optimizers update their state in place)."""
        cfg, round_idx = self.config, state.round + 1
        state = ServerState(state.round, state.params, {k: v.clone() for k, v in state.opt_state.items()})
        start = time.perf_counter()
        rng = np.random.default_rng([self.seed, 3, round_idx])
        selection = select_clients(self.devices.properties(round_idx), cfg.fraction, cfg.min_clients,
                                   cfg.over_selection, self.eligible, rng)
        record: dict[str, Any] = {"round": round_idx, "eligible": selection.num_eligible,
                                  "selected": len(selection.selected), "participants": 0, "dropped": 0,
                                  "bytes_down": 0, "bytes_up": 0}
        # Broadcast: each selected client gets the weights and its own plan object.
        plans = {cid: cfg.plan.for_client(client_seed(self.seed, round_idx, cid)) for cid in selection.selected}
        finish = {cid: self.devices.finish_time(cid, plans[cid].num_steps(self.data.num_examples(cid)),
                                                self.model_bytes, self.upload_bytes) for cid in selection.selected}
        kept, dropped = split_on_time(finish, selection.target, cfg.devices.deadline_s)
        record["dropped"] = len(dropped)
        record["bytes_down"] = self.model_bytes * len(selection.selected)
        if self.privacy.budget_spent(state.opt_state):
            record["skipped"] = record["stop"] = True  # the privacy budget is spent: no more releases
            record["bytes_down"] = record["dropped"] = 0
        elif len(kept) < cfg.min_clients:
            record["skipped"] = True  # quorum not reached: the global model stays as it is
        else:
            state = self._train_and_aggregate(state, selection.selected, kept, plans, record)
            record["sim_time_s"] = max(finish[cid] for cid in kept)
        self.privacy.record_epsilon(state.opt_state, record)
        state = ServerState(round_idx, state.params, state.opt_state)
        record.update(self._evaluate(state, round_idx, final=bool(record.get("stop"))))
        record["wall_s"] = time.perf_counter() - start
        return state, record

    def _client_data(self, cid: int) -> ClientData:
        x, y = self.data.client_train(cid)
        if self.config.attack.kind == "label_flip" and cid in self.attackers:
            y = flip_labels(y, self.data.num_classes)
        return ClientData(x, y)

    def _aggregator(self, state: ServerState, round_idx: int) -> Aggregator:
        inner = make_aggregator(self.config.strategy, state.params.numel(), seed=self.seed, round_idx=round_idx)
        return self.privacy.wrap(inner, state.opt_state, round_idx)

    def _train_and_aggregate(self, state: ServerState, selected: list[int], kept: list[int], plans,
                             record) -> ServerState:
        round_idx, attack = state.round + 1, self.config.attack
        tasks = [ClientTask(cid, plans[cid], self._client_data(cid)) for cid in kept]
        aggregator = self._aggregator(state, round_idx)
        try:
            if hasattr(aggregator, "begin"):  # e.g. secure aggregation sets up keys with the selected clients
                aggregator.begin(list(selected))
        except SecAggError as err:  # e.g. too few clients selected to hide any one of them
            record["skipped"], record["aggregation_error"] = True, str(err)
            return state
        loss_sum, examples = 0.0, 0
        if self.attackers:
            record["attackers"] = 0
        for task, update in self.executor.run(self.model, self.spec, state.params, tasks):
            cid, delta = task.client_id, update.delta
            if cid in self.attackers:
                record["attackers"] += 1
                generator = torch.Generator().manual_seed(stage_seed(self.seed, round_idx, cid, 3))
                delta = poison_delta(attack.kind, delta, attack.scale, generator)
            encoded = self.stages.encode(cid, delta, round_idx)  # client side: local DP, compression
            record["bytes_up"] += encoded.nbytes
            aggregator.add(cid, Update(self.stages.decode(cid, encoded), update.num_examples, update.metrics))
            loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
            examples += update.num_examples
            record["participants"] += 1
        record["train_loss"] = loss_sum / max(examples, 1)
        try:
            mean_delta = aggregator.result()
        except (SecAggError, TooFewUpdates) as err:  # e.g. too many dropouts: this round releases nothing
            record["skipped"], record["aggregation_error"] = True, str(err)
            return state
        if hasattr(aggregator, "traffic"):  # secure aggregation: count the protocol's own messages
            traffic = aggregator.traffic()
            record["bytes_up"] = traffic["bytes_up"]
            record["bytes_down"] += traffic["bytes_down"]
        params, opt_state = self.server_opt.apply(state.params, mean_delta, state.opt_state)
        self.privacy.after_release(aggregator, opt_state, record)
        return ServerState(state.round, params, opt_state)

    def _evaluate(self, state: ServerState, round_idx: int, final: bool = False) -> dict[str, float]:
        cfg, out = self.config, {}
        last = final or round_idx == cfg.rounds
        if last or (cfg.eval_every and round_idx % cfg.eval_every == 0):
            metrics = evaluate(self.model, self.spec, state.params, self.data.test_x, self.data.test_y)
            out.update(accuracy=metrics["accuracy"], loss=metrics["loss"])
        if cfg.federated_eval_every and (last or round_idx % cfg.federated_eval_every == 0):
            out.update(self.federated_evaluate(state.params))
        return out

    def federated_evaluate(self, params: torch.Tensor) -> dict[str, float]:
        """Accuracy on each client's held-out data, weighted by its size."""
        correct = loss = total = 0.0
        for cid in range(self.data.num_clients):
            x, y = self.data.client_eval(cid)
            if len(y):
                m = evaluate(self.model, self.spec, params, x, y)
                correct += m["accuracy"] * len(y)
                loss += m["loss"] * len(y)
                total += len(y)
        if not total:
            raise ValueError("federated evaluation needs data.eval_fraction > 0")
        return {"fed_accuracy": correct / total, "fed_loss": loss / total}
