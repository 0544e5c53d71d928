"""The update pipeline over the network, built from the simulator's own pieces.

Client process: `ClientStages.encode` (clip + local-DP noise, compression with error feedback kept in the client's
memory across rounds), then the codec's tensors travel as named parts (`wire.py`). Server: `ClientStages.decode`,
then the aggregator of `FederatedServer._aggregator` (central DP wraps FedAvg) and the simulator's accounting
(`FederatedServer.epsilon`, `budget_spent`, `initial_state`), called on `PrivacyBook` instead of a simulator, which
would hold every client's training data. Randomness is seeded per (run, round, client, stage) as in the simulator.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import torch

from plait.federated.config import FLConfig
from plait.federated.privacy.central import CentralDPAggregator
from plait.federated.server import FederatedServer, ServerState


def pipeline_fingerprint(fl: FLConfig) -> str:
    """What client and server must agree on for an update to be read right: canonical JSON of the client stages."""
    s, p = fl.strategy, fl.privacy
    stages: dict[str, Any] = {"strategy": s.name, "weighting": s.weighting, "compression": asdict(fl.compression),
                              "privacy": {"mode": p.mode}}
    if s.name == "secagg":
        stages["secagg"] = asdict(s.secagg)
    if p.mode == "local":
        stages["privacy"].update(clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier)
    return json.dumps(stages, sort_keys=True, separators=(",", ":"))


class PrivacyBook:
    """The simulator's per-round privacy logic for a server that holds no client data: the same methods of
    `FederatedServer`, run on the attributes they read (config, seed, expected clients, sample rate)."""

    epsilon = FederatedServer.epsilon
    budget_spent = FederatedServer.budget_spent
    aggregator = FederatedServer._aggregator
    initial_state = FederatedServer.initial_state

    def __init__(self, fl: FLConfig, seed: int, num_clients: int, initial_params: torch.Tensor, server_opt):
        self.config, self.seed = fl, seed
        self.initial_params, self.server_opt = initial_params, server_opt
        # as FederatedServer.__init__: the fixed denominator and the sampling rate of the accountant
        target = max(fl.min_clients, math.ceil(fl.fraction * num_clients))
        self.expected_clients = fl.privacy.expected_clients or min(target, num_clients)
        self.sample_rate = min(1.0, self.expected_clients / num_clients)

    @property
    def enabled(self) -> bool:
        return self.config.privacy.mode != "none"

    def after_release(self, aggregator, opt_state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """The bookkeeping after an aggregate was released (as FederatedServer._train_and_aggregate does)."""
        p = self.config.privacy
        if p.mode != "none":
            opt_state["dp_rounds"] = opt_state["dp_rounds"] + 1
        if isinstance(aggregator, CentralDPAggregator):
            record["dp_clip_norm"] = aggregator.clip_norm
            record["dp_unclipped_fraction"] = aggregator.unclipped_fraction
            if p.adaptive:
                opt_state["dp_clip_norm"] = torch.tensor(aggregator.next_clip_norm(p.target_quantile, p.clip_lr),
                                                         dtype=torch.float64)

    def record_epsilon(self, state: ServerState, record: dict[str, Any]) -> None:
        if self.enabled:
            record["epsilon"] = self.epsilon(int(state.opt_state["dp_rounds"]))
