"""Clients' data made when a client is asked for, not at start (`data.materialise = "lazy"`, the default past
100 000 clients): a federation of a million registered clients costs what its pooled examples cost, and a round what
its cohort's data costs.

- `LazyFederatedData`: one pooled set and a partition spec (data/partition_spec.py); client k's examples are
  gathered (a copy of its rows) when k trains.
- `ClientFolder`: a folder of `client-<k>.npz` files (data/user.py's format), each read when k is asked for; at
  start only the file names are listed.

A client's held-out share comes from a generator seeded by (seed, client), not from one generator run through every
client as in `FederatedData`: with `data.eval_fraction = 0` an exact partition gives the very same clients, with a
held-out share a different (equally random) one. Recently asked clients are cached (`CACHED_CLIENTS`), so a round
that asks a client's size, then its data, computes it once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from plait.data.partition_spec import PartitionSpec
from plait.data.user import Inputs, Labelled, labelled_file, take

CACHED_CLIENTS = 1024  # clients whose indices are kept (a few KiB each)
CACHED_FILES = 256     # clients whose files are kept (a folder's clients may be large)
HELD_OUT_STREAM = 43  # client k's held-out share: default_rng([seed, HELD_OUT_STREAM, k])
CLASS_SAMPLE = 64     # a folder's number of classes is read from test.npz and this many clients' files


class ClientSets(Protocol):
    """What the simulator needs of its clients' data (`FederatedData`, `LazyFederatedData`, `ClientFolder`)."""

    @property
    def test_x(self) -> Inputs: ...

    @property
    def test_y(self) -> torch.Tensor: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def num_clients(self) -> int: ...

    def num_examples(self, client: int) -> int: ...

    def client_train(self, client: int) -> tuple[Inputs, torch.Tensor]: ...

    def client_train_raw(self, client: int) -> tuple[Inputs, torch.Tensor, Callable[[Inputs], Inputs] | None]:
        """`client_train`'s rows as stored, and what makes them model inputs (None: they are already)."""
        ...

    def client_eval(self, client: int) -> tuple[Inputs, torch.Tensor]: ...


def held_out_split(part: np.ndarray, eval_fraction: float, rng_seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) of one client's sorted indices, as FederatedData splits them: a random share held out,
    every client keeping at least one example to train on."""
    held = min(int(round(len(part) * eval_fraction)), len(part) - 1)
    if not held:
        return part, part[:0]
    shuffled = np.random.default_rng(rng_seed).permutation(part)
    return np.sort(shuffled[held:]), np.sort(shuffled[:held])


class _CachedSplits:
    """Client k's (train, held-out) indices, computed by `split(k)` and cached for the last CACHED_CLIENTS asked."""

    def __init__(self, num_clients: int):
        self._num_clients = num_clients
        self.split = lru_cache(maxsize=CACHED_CLIENTS)(self._checked_split)

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def _checked_split(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= client < self._num_clients:
            raise ValueError(f"client {client}: data.num_clients is {self._num_clients}")
        return self._compute_split(client)

    def _compute_split(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class LazyFederatedData(_CachedSplits):
    """One pooled set; client k's rows gathered from it when k is asked for."""

    def __init__(self, train_x: Inputs, train_y: torch.Tensor, test_x: Inputs, test_y: torch.Tensor,
                 spec: PartitionSpec, eval_fraction: float, seed: int, num_classes: int):
        super().__init__(spec.num_clients)
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.spec, self.eval_fraction, self.seed, self.num_classes = spec, eval_fraction, seed, num_classes

    def _compute_split(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        return held_out_split(self.spec.indices(client), self.eval_fraction, [self.seed, HELD_OUT_STREAM, client])

    def num_examples(self, client: int) -> int:
        size = getattr(self.spec, "size", None)
        if size is None or not 0 <= client < self.num_clients:
            return len(self.split(client)[0])
        total = size(client)  # without drawing the client's examples; the held-out rule of held_out_split
        return total - min(int(round(total * self.eval_fraction)), total - 1)

    def _rows(self, index: np.ndarray) -> tuple[Inputs, torch.Tensor]:
        rows = torch.from_numpy(index)
        return take(self.train_x, rows), self.train_y[rows]

    def client_train(self, client: int) -> tuple[Inputs, torch.Tensor]:
        return self._rows(self.split(client)[0])

    def client_train_raw(self, client: int) -> tuple[Inputs, torch.Tensor, None]:
        return (*self.client_train(client), None)

    def client_eval(self, client: int) -> tuple[Inputs, torch.Tensor]:
        return self._rows(self.split(client)[1])


def client_file_ids(folder: Path, num_clients: int) -> None:
    """Check that `client-0.npz` .. `client-<num_clients - 1>.npz` are in the folder, from the names alone."""
    pattern = re.compile(r"client-(\d+)\.npz")
    present = np.zeros(num_clients, dtype=bool)
    found = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if (m := pattern.fullmatch(entry.name)) is not None:
                found += 1
                if int(m.group(1)) < num_clients:
                    present[int(m.group(1))] = True
    if not found:
        raise ValueError(f"data.source = {str(folder)!r}: no client-<id>.npz files in the folder")
    missing = np.flatnonzero(~present)
    if len(missing):
        raise ValueError(f"data.source = {str(folder)!r}: data.num_clients = {num_clients}, but client files "
                         f"{[f'client-{k}.npz' for k in missing[:5]]} are missing ({found} client files)")


class ClientFolder(_CachedSplits):
    """A folder of client-<k>.npz files, client k's read when k is asked for (the last CACHED_FILES kept)."""

    def __init__(self, folder: Path, num_clients: int, eval_fraction: float, seed: int, test: Labelled | None):
        client_file_ids(folder, num_clients)
        super().__init__(num_clients)
        self.folder, self.eval_fraction, self.seed = folder, eval_fraction, seed
        self._read = lru_cache(maxsize=CACHED_FILES)(self._read_client)
        first = self._read(0)
        self.test_x, self.test_y = (test.x, test.y) if test else (take(first.x, slice(0, 0)), first.y[:0])
        labels = [self._read(k).y for k in range(min(num_clients, CLASS_SAMPLE))] + ([test.y] if test else [])
        classification = not first.y.is_floating_point()
        self.num_classes = int(max(int(y.max()) for y in labels if len(y))) + 1 if classification else 0

    def _read_client(self, client: int) -> Labelled:
        own = labelled_file(self.folder / f"client-{client}.npz", "data.source")
        if len(own) == 0:
            raise ValueError(f"data.source: client {client} (client-{client}.npz) has no examples")
        return own

    def _compute_split(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        part = np.arange(len(self._read(client)))
        return held_out_split(part, self.eval_fraction, [self.seed, HELD_OUT_STREAM, client])

    def num_examples(self, client: int) -> int:
        return len(self.split(client)[0])

    def _rows(self, client: int, index: np.ndarray) -> tuple[Inputs, torch.Tensor]:
        own, rows = self._read(client), torch.from_numpy(index)
        return take(own.x, rows), own.y[rows]

    def client_train(self, client: int) -> tuple[Inputs, torch.Tensor]:
        return self._rows(client, self.split(client)[0])

    def client_train_raw(self, client: int) -> tuple[Inputs, torch.Tensor, None]:
        return (*self.client_train(client), None)

    def client_eval(self, client: int) -> tuple[Inputs, torch.Tensor]:
        return self._rows(client, self.split(client)[1])
