"""Graphs for decentralised FL: who gossips with whom, and the mixing matrix of one averaging step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from plait.federated.seeds import TOPOLOGY, stream

Topology = Literal["none", "ring", "torus", "random_regular", "complete"]


@dataclass(kw_only=True, slots=True)
class GossipConfig:
    topology: Topology = "none"    # "none": the usual server-based rounds; otherwise server-less gossip
    degree: int = 4                # random_regular: neighbours per node
    gossip_steps: int = 1          # mixing steps X ← W X per round
    eval_nodes: int = 5            # nodes whose own models are also scored at each evaluation

    def __post_init__(self) -> None:
        if self.degree < 1 or self.gossip_steps < 1 or self.eval_nodes < 0:
            raise ValueError("fl.gossip.degree and fl.gossip.gossip_steps must be >= 1, eval_nodes >= 0")

    @property
    def enabled(self) -> bool:
        return self.topology != "none"


def neighbours(topology: Topology, num_nodes: int, degree: int, seed: int) -> list[set[int]]:
    """Undirected adjacency lists (no self loops)."""
    adj: list[set[int]] = [set() for _ in range(num_nodes)]

    def link(a: int, b: int) -> None:
        if a != b:
            adj[a].add(b)
            adj[b].add(a)

    if topology == "complete":
        for a in range(num_nodes):
            for b in range(a + 1, num_nodes):
                link(a, b)
    elif topology == "ring":
        for a in range(num_nodes):
            link(a, (a + 1) % num_nodes)
    elif topology == "torus":
        side = math.isqrt(num_nodes)
        if side * side != num_nodes:
            raise ValueError(f"fl.gossip.topology = 'torus' needs a square number of clients, got {num_nodes}")
        for a in range(num_nodes):
            row, col = divmod(a, side)
            link(a, row * side + (col + 1) % side)
            link(a, ((row + 1) % side) * side + col)
    elif topology == "random_regular":
        if degree >= num_nodes or (degree * num_nodes) % 2:
            raise ValueError(f"fl.gossip.degree = {degree}: a random regular graph on {num_nodes} nodes needs "
                             "degree < nodes and degree × nodes even")
        rng = stream(seed, TOPOLOGY)
        for _attempt in range(1000):  # pairing model: retry until simple (no loops, no multi-edges)
            stubs = rng.permutation(np.repeat(np.arange(num_nodes), degree)).reshape(-1, 2)
            if (stubs[:, 0] != stubs[:, 1]).all() and len({tuple(sorted(p)) for p in stubs.tolist()}) == len(stubs):
                for a, b in stubs.tolist():
                    link(a, b)
                break
        else:
            raise ValueError(f"could not draw a simple {degree}-regular graph on {num_nodes} nodes")
    else:
        raise ValueError(f"fl.gossip.topology = {topology!r} is not a graph")
    return adj


def mixing_matrix(adj: list[set[int]]) -> torch.Tensor:
    """Metropolis–Hastings weights: W_ij = 1 / (1 + max(d_i, d_j)) on edges, the rest on the diagonal."""
    n = len(adj)
    weights = torch.zeros(n, n, dtype=torch.float64)
    for i, nbrs in enumerate(adj):
        for j in nbrs:
            weights[i, j] = 1.0 / (1 + max(len(adj[i]), len(adj[j])))
        weights[i, i] = 1.0 - weights[i].sum()
    return weights
