"""Partitioners: split example indices among clients. Each is deterministic given its seed.

Every function returns a list with one sorted int64 index array per client.
"""

from __future__ import annotations

import numpy as np


def check_counts(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(f"cannot give {num_clients} clients at least one of {num_examples} examples")


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then deal equal shares (sizes differ by at most one)."""
    check_counts(num_clients, num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into equal shards, deal each client
    `shards_per_client` of them at random (MNIST: 200 shards of 300, 2 per client)."""
    num_shards = num_clients * shards_per_client
    check_counts(num_shards, len(labels))
    order = np.argsort(labels, kind="stable")
    shard_list = np.array_split(order, num_shards)
    pick = np.random.default_rng(seed).permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shard_list[s] for s in row])) for row in pick]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Label skew: for each class, split its examples among clients in proportions drawn from Dirichlet(alpha).
    Small alpha → each client sees few classes; large alpha → close to IID. Redraws (bounded) until every client
    holds at least `min_size` examples."""
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    check_counts(num_clients, len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ValueError(f"dirichlet(alpha={alpha}) could not give all {num_clients} clients {min_size} examples")


def quantity_skew(num_examples: int, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """IID labels, skewed sizes: client shares drawn from Dirichlet(alpha) (small alpha → very unequal)."""
    if alpha <= 0:
        raise ValueError(f"quantity_skew alpha must be > 0, got {alpha}")
    check_counts(num_clients, num_examples)
    if num_examples < num_clients * min_size:
        raise ValueError(f"{num_examples} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    spare = num_examples - num_clients * min_size
    sizes = min_size + np.floor(rng.dirichlet(np.full(num_clients, alpha)) * spare).astype(np.int64)
    sizes[: num_examples - sizes.sum()] += 1  # hand out the rounding remainder
    order = rng.permutation(num_examples)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def natural(groups: np.ndarray) -> list[np.ndarray]:
    """One client per group id (writer, speaker, role), in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # group ids by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    client_of = rank[inverse]
    return [np.flatnonzero(client_of == c) for c in range(len(order))]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[num_clients, num_classes] counts, for tests and for plots of the skew."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
