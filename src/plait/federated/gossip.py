"""Decentralised (server-less) federated learning: gossip averaging over a graph (D-PSGD, Lian et al. 2017).

Every node keeps its own model. Each round a fraction of the nodes trains locally with the same `client_update` as
the server-based simulator, then every node replaces its weights by a weighted average of its neighbours'
(`gossip_steps` times): X ← W X with W the Metropolis–Hastings mixing matrix of the graph, symmetric and doubly
stochastic, so the average model is preserved exactly and the nodes drift towards consensus. No node sees
another's data, and no server exists: the only traffic is model exchange along the graph's edges.

The runner has the simulator's server interface (`initial_state`, `run_round`, `executor`), so run directories,
checkpoints (the stacked [nodes, params] weights), `--resume` and plots work unchanged. The nodes' weights stay on
the CPU; a node trains, and the models are evaluated, on `fl.device` like the simulator's clients.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from plait.data.lazy import ClientSets
from plait.federated.client_update import ClientData, client_update
from plait.federated.device import CPU, on_device
from plait.federated.evaluate import evaluate, test_set_record
from plait.federated.executor import SequentialExecutor
from plait.federated.seeds import NODE_EVAL_SAMPLE, client_seed, selection_rng, stream
from plait.federated.server import ServerState
from plait.federated.task import Task
from plait.federated.topology import mixing_matrix, neighbours
from plait.federated.weights import flat_model_state


class GossipRunner:
    """Server-less rounds: local training on a fraction of the nodes, then gossip along the graph."""

    def __init__(self, config, model: torch.nn.Module, data: ClientSets, seed: int, task: Task | None = None,
                 device: torch.device = CPU):
        self.config, self.model, self.data, self.seed, self.task = config, model, data, seed, task or Task()
        self.executor = SequentialExecutor()  # closed by the run loop like any executor
        params, self.spec = flat_model_state(model, buffers=True)
        model.to(device)
        self.test_set = (on_device(data.test_x, device), data.test_y.to(device))  # moved once
        num_nodes = data.num_clients
        self.adj = neighbours(config.gossip.topology, num_nodes, config.gossip.degree, seed)
        self.mixing = mixing_matrix(self.adj).to(params.dtype)
        self.initial_params = params.expand(num_nodes, -1).clone()  # every node starts from the same model
        self.model_bytes = params.numel() * params.element_size()
        self.num_edges = sum(len(a) for a in self.adj) // 2

    def initial_state(self) -> ServerState:
        return ServerState(0, self.initial_params.clone(), {})

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def load_checkpoint_extra(self, ckpt: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        self.executor.close()

    def run_round(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        cfg, round_idx = self.config, state.round + 1
        start = time.perf_counter()
        nodes = self.data.num_clients
        rng = selection_rng(self.seed, round_idx)
        count = max(1, min(nodes, math.ceil(cfg.fraction * nodes)))
        trained = sorted(rng.choice(nodes, size=count, replace=False).tolist())
        params = state.params.clone()
        loss_sum = examples = 0.0
        round_plan = cfg.round_plan(round_idx)
        for node in trained:
            plan = round_plan.for_client(client_seed(self.seed, round_idx, node))
            data = ClientData(*self.data.client_train(node))
            update = client_update(self.model, self.spec, params[node], data, plan, self.task).cpu()
            params[node] += update.delta
            loss_sum += update.metrics["train_loss"] * update.num_examples
            examples += update.num_examples
        for _ in range(cfg.gossip.gossip_steps):
            params = self.mixing @ params  # each node: weighted average of itself and its neighbours
        record: dict[str, Any] = {
            "round": round_idx, "lr": round_plan.lr, "participants": len(trained),
            "train_loss": loss_sum / max(examples, 1),
            # each mixing step sends every model both ways along every edge
            "bytes_up": 2 * self.num_edges * self.model_bytes * cfg.gossip.gossip_steps,
            "consensus_distance": float((params - params.mean(0)).pow(2).sum(1).mean()),
        }
        new_state = ServerState(round_idx, params, {})
        record.update(self._evaluate(new_state, round_idx))
        record["wall_s"] = time.perf_counter() - start
        return new_state, record

    def _evaluate(self, state: ServerState, round_idx: int) -> dict[str, float]:
        cfg = self.config
        if not (round_idx == cfg.rounds or (cfg.eval_every and round_idx % cfg.eval_every == 0)):
            return {}
        test_x, test_y = self.test_set
        average = evaluate(self.model, self.spec, state.params.mean(0), test_x, test_y, task=self.task)
        out = test_set_record(average)  # the average model's
        picks = stream(self.seed, NODE_EVAL_SAMPLE).permutation(self.data.num_clients)[: cfg.gossip.eval_nodes]
        if len(picks) and "accuracy" in average:  # per-node accuracy, for a task that has one
            scores = [evaluate(self.model, self.spec, state.params[int(i)], test_x, test_y, task=self.task)["accuracy"]
                      for i in picks]
            out["node_accuracy_mean"] = float(np.mean(scores))
            out["node_accuracy_min"] = float(np.min(scores))
        return out
