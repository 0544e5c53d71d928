"""Partitions computed on demand: client k's example indices from the seed and k, when k is asked for, so that a
federation of a million clients holds no per-client array (data/lazy.py uses them).

Two kinds:

- exact shares (`IidShares`, `ShardDeal`): the same split as `partition.iid` / `partition.shards`, from one
  permutation of the examples or of the shards (memory: one int per example or per shard, not per client);
- draws (`IidDraws`, `ShardDraws`, `DirichletDraws`, chosen by `data.examples_per_client`): each client draws its
  own examples from the pool with a generator seeded by (seed, client), so there may be more clients than
  examples. Clients then overlap: two clients can hold the same example. That is the price of 10^6 clients on a
  60 000-example set, and why a draw is never the default.

`contiguous_runs` wraps per-client sets already concatenated (a folder's or a loader's own partition).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from plait.data.partition import check_counts

DRAW_STREAM = 41  # the per-client generator of a draw is default_rng([seed, DRAW_STREAM, client])


class PartitionSpec(Protocol):
    """Client k's example indices on demand. A spec that knows a client's size without drawing its examples also
    has `size(client)` (all but DirichletDraws): asking every client's size then costs no draws."""

    num_clients: int

    def indices(self, client: int) -> np.ndarray:
        """Client `client`'s example indices into the pooled set: sorted int64."""
        ...


def _split_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """Where part `index` of np.array_split(range(total), parts) starts and stops (the first total % parts parts
    hold one more)."""
    size, extra = divmod(total, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


class IidShares:
    """`partition.iid`, one client at a time: one shuffle of the examples, client k's equal share of it."""

    def __init__(self, num_examples: int, num_clients: int, seed: int):
        check_counts(num_clients, num_examples)
        self.num_clients = num_clients
        self._order = np.random.default_rng(seed).permutation(num_examples)

    def indices(self, client: int) -> np.ndarray:
        start, stop = _split_bounds(len(self._order), self.num_clients, client)
        return np.sort(self._order[start:stop])

    def size(self, client: int) -> int:
        start, stop = _split_bounds(len(self._order), self.num_clients, client)
        return stop - start


class ShardDeal:
    """`partition.shards`, one client at a time: the label-sorted examples cut into shards, a permutation of the
    shards dealt `shards_per_client` to each client."""

    def __init__(self, labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int):
        self.num_shards = num_clients * shards_per_client
        check_counts(self.num_shards, len(labels))
        self.num_clients = num_clients
        self._order = np.argsort(labels, kind="stable")
        self._pick = np.random.default_rng(seed).permutation(self.num_shards).reshape(num_clients, shards_per_client)

    def indices(self, client: int) -> np.ndarray:
        runs = [self._order[slice(*_split_bounds(len(self._order), self.num_shards, int(s)))]
                for s in self._pick[client]]
        return np.sort(np.concatenate(runs))

    def size(self, client: int) -> int:
        return sum(stop - start for start, stop in
                   (_split_bounds(len(self._order), self.num_shards, int(s)) for s in self._pick[client]))


def _client_rng(seed: int, client: int) -> np.random.Generator:
    return np.random.default_rng([seed, DRAW_STREAM, client])


class IidDraws:
    """Each client draws `per_client` distinct examples uniformly from the pool."""

    def __init__(self, num_examples: int, num_clients: int, per_client: int, seed: int):
        if per_client > num_examples:
            raise ValueError(f"data.examples_per_client = {per_client} is more than the {num_examples} examples")
        self.num_clients, self.num_examples, self.per_client, self.seed = num_clients, num_examples, per_client, seed

    def indices(self, client: int) -> np.ndarray:
        rng = _client_rng(self.seed, client)
        return np.sort(rng.choice(self.num_examples, self.per_client, replace=False).astype(np.int64))

    def size(self, client: int) -> int:
        return self.per_client


class ShardDraws:
    """McMahan's shards with a shared pool: the label-sorted examples cut into shards of per_client //
    shards_per_client, each client drawing `shards_per_client` distinct shards (two clients may draw the same)."""

    def __init__(self, labels: np.ndarray, num_clients: int, shards_per_client: int, per_client: int, seed: int):
        self.shard_len = per_client // shards_per_client
        if self.shard_len < 1 or shards_per_client * self.shard_len > len(labels):
            raise ValueError(f"data.examples_per_client = {per_client} must give each of data.shards_per_client = "
                             f"{shards_per_client} shards at least one example, and fit in {len(labels)} examples")
        self.num_clients, self.shards_per_client, self.seed = num_clients, shards_per_client, seed
        self._order = np.argsort(labels, kind="stable")
        self._num_shards = len(labels) // self.shard_len

    def indices(self, client: int) -> np.ndarray:
        shards = _client_rng(self.seed, client).choice(self._num_shards, self.shards_per_client, replace=False)
        return np.sort(np.concatenate([self._order[s * self.shard_len : (s + 1) * self.shard_len] for s in shards]))

    def size(self, client: int) -> int:
        return self.shards_per_client * self.shard_len


class DirichletDraws:
    """Label skew one client at a time (Hsu et al. 2019): client k's class shares drawn from Dirichlet(alpha), then
    `per_client` examples drawn by those shares (a class holds at most its own examples)."""

    def __init__(self, labels: np.ndarray, num_clients: int, alpha: float, per_client: int, seed: int):
        if alpha <= 0:
            raise ValueError(f"data.alpha must be > 0, got {alpha}")
        self.num_clients, self.alpha, self.per_client, self.seed = num_clients, alpha, per_client, seed
        self._by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def indices(self, client: int) -> np.ndarray:
        rng = _client_rng(self.seed, client)
        shares = rng.dirichlet(np.full(len(self._by_class), self.alpha))
        counts = rng.multinomial(self.per_client, shares / shares.sum())
        chunks = [pool[rng.choice(len(pool), min(count, len(pool)), replace=False)]
                  for pool, count in zip(self._by_class, counts) if count]
        return np.sort(np.concatenate(chunks))


class ContiguousRuns:
    """Per-client sets laid end to end: client k holds examples bounds[k]:bounds[k + 1]."""

    def __init__(self, sizes: np.ndarray):
        self.num_clients = len(sizes)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def indices(self, client: int) -> np.ndarray:
        return np.arange(self._bounds[client], self._bounds[client + 1])

    def size(self, client: int) -> int:
        return int(self._bounds[client + 1] - self._bounds[client])


def partition_spec(partition: str, labels: np.ndarray, num_clients: int, *, shards_per_client: int, alpha: float,
                   examples_per_client: int, seed: int) -> PartitionSpec:
    """The lazy form of `data.partition`; a clear error for a partition that has none."""
    per_client = examples_per_client
    if partition == "iid":
        if per_client:
            return IidDraws(len(labels), num_clients, per_client, seed)
        if num_clients > len(labels):
            raise ValueError(f"data.num_clients = {num_clients} is more than the {len(labels)} examples: set "
                             "data.examples_per_client to give each client its own draw from the pool (clients "
                             "then overlap)")
        return IidShares(len(labels), num_clients, seed)
    if partition == "shards":
        if per_client:
            return ShardDraws(labels, num_clients, shards_per_client, per_client, seed)
        if num_clients * shards_per_client > len(labels):
            raise ValueError(f"data.num_clients = {num_clients} needs {num_clients * shards_per_client} shards of the "
                             f"{len(labels)} examples: set data.examples_per_client to draw shards from a shared pool")
        return ShardDeal(labels, num_clients, shards_per_client, seed)
    if partition == "dirichlet":
        if not per_client:
            raise ValueError("data.partition = 'dirichlet' with clients computed lazily (data.materialise) needs "
                             "data.examples_per_client: each client draws that many examples with class shares from "
                             "Dirichlet(data.alpha)")
        return DirichletDraws(labels, num_clients, alpha, per_client, seed)
    raise ValueError(f"data.partition = {partition!r} has no lazy form (data.materialise = 'lazy', or more than "
                     "100 000 clients): use 'iid', 'shards' or 'dirichlet', or data.materialise = 'eager'")
