"""A data set split among federated clients: each client's train and held-out tensors, plus the central test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from plait.data import partition
from plait.data.images import load_image_set
from plait.data.shakespeare import SEQ_LEN, VOCAB, load_shakespeare

# Per-pixel statistics of the MNIST training set, used for both image sets (Fashion's are close enough for SGD).
_MEAN, _STD = 0.1307, 0.3081


@dataclass(kw_only=True, slots=True)
class DataConfig:
    name: Literal["mnist", "fashion_mnist", "shakespeare"] = "mnist"
    path: str = ""                   # a directory with the user's own copy (IDX files, or the plays' .md files)
    cache_dir: str = ""              # where .npz caches live; default ~/.cache/plait or $PLAIT_CACHE
    num_clients: int = 100
    partition: Literal["iid", "shards", "dirichlet", "quantity", "natural"] = "shards"
    shards_per_client: int = 2       # shards: McMahan's 200 shards of 300 for 100 clients
    alpha: float = 0.5               # dirichlet (label skew) and quantity skew concentration
    eval_fraction: float = 0.0       # share of each client's data held out for federated evaluation
    max_examples_per_client: int = 0  # shakespeare: cap each role's windows (0: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"data.num_clients must be >= 1, got {self.num_clients}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.name == "shakespeare" and self.partition != "natural":
            raise ValueError("data.partition must be 'natural' for shakespeare (one client per play and role)")
        if self.name != "shakespeare" and self.partition == "natural":
            raise ValueError(f"data.partition = 'natural' needs a data set with writers or roles, not {self.name}")


class FederatedData:
    """Clients' local data. `client_train(i)` / `client_eval(i)` return client i's (x, y) tensors.

    The training tensors are stored client-major: each client's training examples, then each client's held-out
    examples, lie in one contiguous run (in their original order), the examples no client holds at the end. A
    client's data is then a view, not a gathered copy: nothing is copied per round, and a process pool shares the
    whole set once (its storage moves to shared memory at the first send; later tasks send only an offset).
    """

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 parts: list[np.ndarray], eval_fraction: float, seed: int, num_classes: int,
                 held_out_last: bool = False):
        """`held_out_last`: hold out each client's last examples (time order: overlapping text windows must not
        straddle the split) instead of a random share."""
        self.test_x, self.test_y = test_x, test_y
        self.num_classes = num_classes
        rng = np.random.default_rng(seed + 1)
        train_parts, eval_parts = [], []
        for part in parts:
            held = min(int(round(len(part) * eval_fraction)), len(part) - 1)  # every client keeps one to train on
            if held_out_last:
                eval_parts.append(part[len(part) - held :] if held else part[:0])
                train_parts.append(part[: max(1, len(part) - held - (SEQ_LEN if held else 0))])
                continue
            shuffled = rng.permutation(part)
            eval_parts.append(np.sort(shuffled[:held]))
            train_parts.append(np.sort(shuffled[held:]))
        held_by_clients = np.concatenate([*train_parts, *eval_parts]).astype(np.int64)
        rest = np.setdiff1d(np.arange(len(train_y)), held_by_clients, assume_unique=True)
        order = torch.from_numpy(np.concatenate([held_by_clients, rest]))
        self.train_x, self.train_y = train_x[order], train_y[order]
        bounds = np.cumsum([0] + [len(p) for p in train_parts] + [len(p) for p in eval_parts])
        self._train_runs = list(zip(bounds[: len(parts)], bounds[1 : len(parts) + 1]))
        self._eval_runs = list(zip(bounds[len(parts) : -1], bounds[len(parts) + 1 :]))

    @property
    def num_clients(self) -> int:
        return len(self._train_runs)

    def num_examples(self, client: int) -> int:
        start, stop = self._train_runs[client]
        return int(stop - start)

    def client_train(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = self._train_runs[client]
        return self.train_x[start:stop], self.train_y[start:stop]

    def client_eval(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = self._eval_runs[client]
        return self.train_x[start:stop], self.train_y[start:stop]


def _image_parts(config: DataConfig, labels: np.ndarray) -> list[np.ndarray]:
    if config.partition == "iid":
        return partition.iid(len(labels), config.num_clients, config.seed)
    if config.partition == "shards":
        return partition.shards(labels, config.num_clients, config.shards_per_client, config.seed)
    if config.partition == "dirichlet":
        return partition.dirichlet(labels, config.num_clients, config.alpha, config.seed)
    return partition.quantity_skew(len(labels), config.num_clients, config.alpha, config.seed)


def _images_to_tensor(x: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(x).float() / 255.0 - _MEAN) / _STD).unsqueeze(1)  # [N, 1, 28, 28]


def load_federated(config: DataConfig) -> FederatedData:
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if config.name == "shakespeare":
        return _load_shakespeare(config, cache_dir)
    arrays = load_image_set(config.name, config.path or None, cache_dir)
    parts = _image_parts(config, arrays["train_y"])
    return FederatedData(
        _images_to_tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
        _images_to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"]),
        parts, config.eval_fraction, config.seed, num_classes=10,
    )


def _load_shakespeare(config: DataConfig, cache_dir: Path | None) -> FederatedData:
    """Windows of SEQ_LEN characters → next character, one client per role; 10% of each role's windows (the last
    ones, as LEAF splits by time) form the central test set."""
    arrays = load_shakespeare(config.path or None, cache_dir)
    text = torch.from_numpy(arrays["text"].astype(np.int64))
    offsets = arrays["offsets"]
    if config.num_clients > len(offsets) - 1:
        raise ValueError(f"data.num_clients = {config.num_clients}, but Shakespeare has {len(offsets) - 1} roles with "
                         "enough lines")
    roles = np.random.default_rng(config.seed).permutation(len(offsets) - 1)[: config.num_clients]
    xs, ys, parts, test_x, test_y = [], [], [], [], []
    count = 0
    for role in roles:
        windows = text[offsets[role] : offsets[role + 1]].unfold(0, SEQ_LEN + 1, 1)  # a view, no copy
        if config.max_examples_per_client:
            windows = windows[: config.max_examples_per_client]
        cut = max(1, int(len(windows) * 0.9))
        train = windows[: max(1, cut - SEQ_LEN)]  # a gap of SEQ_LEN windows: no character in both splits
        xs.append(train[:, :SEQ_LEN])
        ys.append(train[:, SEQ_LEN])
        test_x.append(windows[cut:, :SEQ_LEN])
        test_y.append(windows[cut:, SEQ_LEN])
        parts.append(np.arange(count, count + len(train)))
        count += len(train)
    return FederatedData(torch.cat(xs), torch.cat(ys), torch.cat(test_x), torch.cat(test_y), parts,
                         config.eval_fraction, config.seed, num_classes=len(VOCAB), held_out_last=True)
