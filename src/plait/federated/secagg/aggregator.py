"""`SecureAggregator`: the strategy-side `Aggregator` (add / result) with secure aggregation inside, for the
in-process simulation. It drives a `SecAggServer` and one `SecAggClient` per selected client, passing only
messages between them (optionally through their byte encoding, as a network transport would) and counting each
client's traffic from the encoded sizes.

    agg = SecureAggregator(dim, SecAggConfig(), weighting="examples", seed=run_seed, round_id=r)
    agg.begin(selected_ids)          # SETUP, ADVERTISE_KEYS, SHARE_KEYS for every selected client
    agg.add(cid, update)             # COLLECT_MASKED: the client masks its update; the server sums
    mean_delta = agg.result()        # UNMASK: survivors' shares; selected clients never added count as dropouts
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import torch

from plait.federated.client_update import Update
from plait.federated.secagg import messages
from plait.federated.secagg.client import SecAggClient
from plait.federated.secagg.config import SecAggConfig
from plait.federated.secagg.protocol import SecAggError, Stage
from plait.federated.secagg.server import SecAggServer, SecureSum


def round_server(config: SecAggConfig, dim: int, selected_ids: Iterable[int], *, weighting: str, seed: int,
                 round_id: int) -> SecAggServer:
    """The server half of one round, past `begin`: the same in the simulation and behind the network server."""
    ids = sorted(int(c) for c in selected_ids)
    # The neighbour graph is public randomness: seeded by the run seed and this round's selection.
    graph_seed = int(np.random.SeedSequence([seed, round_id, *ids]).generate_state(1)[0])
    max_weight = config.max_weight if weighting == "examples" else 1
    server = SecAggServer(config, dim, max_weight=max_weight, round_id=round_id, graph_seed=graph_seed)
    server.begin(ids)
    return server


def weighted_mean(outcome: SecureSum) -> torch.Tensor:
    """FedAvg's weighted mean (float32) from the unmasked sum of [n_k * delta_k, n_k]."""
    if outcome.total_weight <= 0:
        raise SecAggError("secagg: the unmasked total weight is not positive")
    return (outcome.weighted_sum / outcome.total_weight).to(torch.float32)


class SecureAggregator:
    def __init__(self, dim: int, config: SecAggConfig, *, weighting: str = "examples", seed: int = 0,
                 round_id: int = 0, wire: bool = False):
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"strategy.weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.dim, self.config, self.weighting = dim, config, weighting
        self.seed, self.round_id, self.wire = seed, round_id, wire
        self.server: SecAggServer | None = None
        self.clients: dict[int, SecAggClient] = {}
        self.bytes_up: dict[int, int] = {}     # client id -> bytes it sent
        self.bytes_down: dict[int, int] = {}   # client id -> bytes it received
        self.outcome: SecureSum | None = None

    def begin(self, selected_ids: Iterable[int]) -> None:
        """Run the key stages for the round's selected clients, before any of them trains."""
        if self.server is not None:
            raise SecAggError("secagg: begin() called twice for one round")
        ids = sorted(int(c) for c in selected_ids)
        self.server = server = round_server(self.config, self.dim, ids, weighting=self.weighting, seed=self.seed,
                                            round_id=self.round_id)
        self.clients = {cid: SecAggClient(cid, self.config) for cid in ids}
        self.bytes_up = dict.fromkeys(ids, 0)
        self.bytes_down = dict.fromkeys(ids, 0)
        for cid, client in self.clients.items():
            server.receive_keys(self._up(cid, client.advertise()))
        for cid, msg in server.broadcast_keys().items():
            server.receive_shares(self._up(cid, self.clients[cid].share_keys(self._down(cid, msg))))
        for cid, msg in server.forward_shares().items():
            self.clients[cid].receive_shares(self._down(cid, msg))

    def add(self, client_id: int, update: Update) -> None:
        if self.server is None:
            raise SecAggError("secagg: add() before begin(selected_ids); the key stages must run first")
        client = self.clients.get(client_id)
        if client is None:
            raise SecAggError(f"secagg: client {client_id} was not selected for this round (stage COLLECT_MASKED)")
        weight = update.num_examples if self.weighting == "examples" else 1
        self.server.receive_masked(self._up(client_id, client.masked_input(update.delta, weight)))

    def result(self, *, unresponsive: Collection[int] = ()) -> torch.Tensor:
        """The weighted mean of the added updates (float32). `unresponsive`: survivors that vanish during UNMASK
        (simulation of late dropouts; their inputs still count, their shares are simply missing)."""
        if self.server is None:
            raise SecAggError("secagg: result() before begin(selected_ids)")
        server = self.server
        for cid, msg in server.request_unmask().items():
            if cid not in unresponsive:
                server.receive_unmask(self._up(cid, self.clients[cid].unmask(self._down(cid, msg))))
        self.outcome = server.finish()
        return weighted_mean(self.outcome)

    @property
    def stage(self) -> Stage:
        return self.server.state.stage if self.server else Stage.SETUP

    def traffic(self) -> dict[str, Any]:
        """Bytes each client sent and received in this round's protocol messages (encoded sizes)."""
        return {"bytes_up": sum(self.bytes_up.values()), "bytes_down": sum(self.bytes_down.values()),
                "per_client_up": dict(self.bytes_up), "per_client_down": dict(self.bytes_down)}

    def _up(self, cid: int, msg):
        return self._carry(cid, msg, self.bytes_up)

    def _down(self, cid: int, msg):
        return self._carry(cid, msg, self.bytes_down)

    def _carry(self, cid: int, msg, counter: dict[int, int]):
        if not self.wire:
            counter[cid] += msg.wire_size()
            return msg
        data = messages.encode(msg)
        counter[cid] += len(data)
        return messages.decode(data)
