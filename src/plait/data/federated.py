"""A data set split among federated clients: each client's train and held-out tensors, plus the central test set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from plait.data import partition
from plait.data import shakespeare_words as words
from plait.data.image_tensors import images_to_tensor
from plait.data.images import load_image_set
from plait.data.lazy import ClientFolder, ClientSets, LazyFederatedData
from plait.data.partition_spec import ContiguousRuns, PartitionSpec, partition_spec
from plait.data.shakespeare import SEQ_LEN, VOCAB, load_shakespeare
from plait.data.user import (
    Inputs,
    Labelled,
    UserData,
    as_labelled,
    call_loader,
    concat_labelled,
    labelled_file,
    load_user_data,
    take,
)
from plait.user_code import accepts, is_reference

TEXT_SETS = ("shakespeare", "shakespeare_words")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """`[data]`: a built-in data set by `name`, or the user's own by `source` (see data/user.py): a reference to a
    loader (`"package.module:load"`), a .npz file, or a folder of per-client .npz files. `data = "pkg:load"` is
    short for `[data] source = ...`."""

    SHORTHAND: ClassVar[str] = "source"
    name: Literal["mnist", "fashion_mnist", "shakespeare", "shakespeare_words"] = "mnist"
    source: str = ""                 # the user's own data (overrides name)
    test_path: str = ""              # a .npz test set (x, y) the network server evaluates on (it reads no client data)
    path: str = ""                   # a directory with the user's own copy (IDX files, or the plays' .md files)
    cache_dir: str = ""              # where decoded sets are cached (data/cache.py); default $PLAIT_CACHE or
                                     # ~/.cache/plait; "off": decode every time
    num_clients: int = 100
    partition: Literal["iid", "shards", "dirichlet", "quantity", "natural"] = "shards"
    shards_per_client: int = 2       # shards: McMahan's 200 shards of 300 for 100 clients
    alpha: float = 0.5               # dirichlet (label skew) and quantity skew concentration
    eval_fraction: float = 0.0       # share of each client's data held out for federated evaluation
    max_examples_per_client: int = 0  # shakespeare(_words): cap each role's examples (0: all)
    seed: int = 0
    # lazy: each client's data made when it is asked for (data/lazy.py); auto: lazy past LAZY_ABOVE clients
    materialise: Literal["auto", "eager", "lazy"] = "auto"
    examples_per_client: int = 0     # lazy: each client draws this many examples from the pool (clients overlap);
                                     # 0: disjoint shares of it

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"data.num_clients must be >= 1, got {self.num_clients}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.name in TEXT_SETS and self.partition not in ("natural", "iid"):
            raise ValueError(f"data.partition must be 'natural' (one client per play and role) or 'iid' (the same "
                             f"roles' examples dealt evenly) for {self.name}, got {self.partition!r}")
        if self.shards_per_client < 1 or self.alpha <= 0:
            raise ValueError(f"data.shards_per_client must be >= 1 and data.alpha > 0, got {self.shards_per_client} "
                             f"and {self.alpha}")
        if self.examples_per_client < 0:
            raise ValueError(f"data.examples_per_client must be >= 0, got {self.examples_per_client}")
        if self.examples_per_client and self.materialise == "eager":
            raise ValueError("data.examples_per_client draws each client's examples lazily: it needs "
                             "data.materialise = 'auto' or 'lazy'")
        if self.materialise == "lazy" and self.name == "shakespeare" and not self.source:
            raise ValueError("data.materialise = 'lazy': Shakespeare's roles are loaded whole; use 'auto' or 'eager'")

    @property
    def lazy(self) -> bool:
        """Whether clients' data is made when asked for (data/lazy.py) rather than laid out at start."""
        if self.materialise == "auto":  # Shakespeare has fewer roles than that: its own error says so
            shakespeare = self.name == "shakespeare" and not self.source
            return not shakespeare and (self.num_clients > LAZY_ABOVE or self.examples_per_client > 0)
        return self.materialise == "lazy"


LAZY_ABOVE = 100_000  # data.materialise = "auto": clients past which each one's data is made when asked for


class FederatedData:
    """Clients' local data. `client_train(i)` / `client_eval(i)` return client i's (x, y) tensors.

    The examples are numbered client-major: each client's training examples, then each client's held-out examples,
    form one contiguous run (in their original order), the examples no client holds at the end. Without
    `convert_x`, the inputs are stored in that order, so a client's data is a view, not a gathered copy: nothing is
    copied per round. With `convert_x`, the stored inputs are raw (uint8 images: a quarter of float32's memory, 47 MB
    for MNIST's training set against 188 MB) and each client's run is made model-ready when asked for (a 600-image
    client in about 0.3 ms). Its rows are then laid out client-major when it is first asked for, not all at start:
    gathering MNIST whole took 0.03 s of start-up, mostly first touches of 47 MB of fresh pages, and a simulation
    asks for few of its clients early (benchmarks/RESULTS.md, issue 13).
    """

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 parts: list[np.ndarray], eval_fraction: float, seed: int, num_classes: int,
                 held_out_last: bool = False, window: int = SEQ_LEN,
                 convert_x: Callable[[Inputs], Inputs] | None = None):
        """`held_out_last`: hold out each client's last examples (time order: overlapping text windows must not
        straddle the split, so `window` examples before them are left out) instead of a random share.
        `convert_x(rows)`: what a client's stored rows become when asked for (default: the rows as they are; uint8
        images are made float, data/image_tensors.py)."""
        self.test_x, self.test_y = test_x, test_y
        self.num_classes = num_classes
        rng = np.random.default_rng(seed + 1)
        train_parts, eval_parts = [], []
        for part in parts:
            held = min(int(round(len(part) * eval_fraction)), len(part) - 1)  # every client keeps one to train on
            if held_out_last:
                eval_parts.append(part[len(part) - held :] if held else part[:0])
                train_parts.append(part[: max(1, len(part) - held - (window if held else 0))])
                continue
            shuffled = rng.permutation(part)
            eval_parts.append(np.sort(shuffled[:held]))
            train_parts.append(np.sort(shuffled[held:]))
        held_by_clients = np.concatenate([*train_parts, *eval_parts]).astype(np.int64)
        rest = np.setdiff1d(np.arange(len(train_y)), held_by_clients, assume_unique=True)
        order = np.concatenate([held_by_clients, rest])
        self.train_y = train_y[torch.from_numpy(order)]
        self._convert_x = convert_x
        self._client_major: torch.Tensor | None = None
        if convert_x is not None and isinstance(train_x, torch.Tensor):
            self.train_x = train_x  # raw, as given; a run is laid out when first asked for (the class's docstring)
            self._client_major = torch.empty((len(order), *train_x.shape[1:]), dtype=train_x.dtype)
            self._order, self._laid_out = order, set[tuple[int, int]]()  # the runs laid out so far
        else:
            self.train_x = _rows(train_x, order)  # each client's run a view from the start
        bounds = np.cumsum([0] + [len(p) for p in train_parts] + [len(p) for p in eval_parts])
        self._train_runs = list(zip(bounds[: len(parts)], bounds[1 : len(parts) + 1]))
        self._eval_runs = list(zip(bounds[len(parts) : -1], bounds[len(parts) + 1 :]))

    @property
    def num_clients(self) -> int:
        return len(self._train_runs)

    def num_examples(self, client: int) -> int:
        start, stop = self._train_runs[client]
        return int(stop - start)

    def client_train(self, client: int) -> tuple[Inputs, torch.Tensor]:
        x, y = self._stored_run(*self._train_runs[client])
        return self._converted(x), y

    def client_train_raw(self, client: int) -> tuple[Inputs, torch.Tensor, Callable[[Inputs], Inputs] | None]:
        """The client's stored rows as they are (a view), its labels, and what makes the rows model inputs (None:
        they are already): whoever trains the client converts them, a pool's worker included."""
        return (*self._stored_run(*self._train_runs[client]), self._convert_x)

    def client_eval(self, client: int) -> tuple[Inputs, torch.Tensor]:
        x, y = self._stored_run(*self._eval_runs[client])
        return self._converted(x), y

    def _converted(self, x: Inputs) -> Inputs:
        return self._convert_x(x) if self._convert_x is not None else x

    def _stored_run(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        if self._client_major is None:
            x = take(self.train_x, slice(start, stop))
        else:
            if (start, stop) not in self._laid_out:  # two threads asking at once write the same rows: harmless
                _rows(self.train_x, self._order[start:stop], out=self._client_major[start:stop])
                self._laid_out.add((start, stop))
            x = self._client_major[start:stop]
        return x, self.train_y[start:stop]


_NUMPY_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                 torch.float64, torch.bool)


def _rows(inputs: Inputs, order: np.ndarray, out: torch.Tensor | None = None) -> Inputs:
    """`take(inputs, order)`, written into `out` when given (a tensor input's rows); a CPU tensor's rows are gathered
    by numpy, 3-5x faster than torch's indexing (MNIST's 60 000 images: 12 ms against 67 ms), into memory from
    torch's allocator (see data/image_tensors.py on numpy's huge pages)."""
    if not (isinstance(inputs, torch.Tensor) and inputs.device.type == "cpu" and inputs.dtype in _NUMPY_DTYPES
            and not inputs.requires_grad):
        rows = take(inputs, torch.from_numpy(order))
        if out is None:
            return rows
        assert isinstance(rows, torch.Tensor)  # `out` is given only for one tensor's rows
        return out.copy_(rows)
    assert not len(order) or 0 <= order.min() <= order.max() < len(inputs), "client-major order out of range"
    if out is None:
        out = torch.empty((len(order), *inputs.shape[1:]), dtype=inputs.dtype)
    np.take(inputs.numpy(), order, axis=0, out=out.numpy(), mode="clip")  # in range (above): no buffered copy
    return out


def _image_parts(config: DataConfig, labels: np.ndarray) -> list[np.ndarray]:
    if config.partition == "iid":
        return partition.iid(len(labels), config.num_clients, config.seed)
    if config.partition == "shards":
        return partition.shards(labels, config.num_clients, config.shards_per_client, config.seed)
    if config.partition == "dirichlet":
        return partition.dirichlet(labels, config.num_clients, config.alpha, config.seed)
    if config.partition == "quantity":
        return partition.quantity_skew(len(labels), config.num_clients, config.alpha, config.seed)
    # "natural" (the only other): one built-in image set has no clients of its own; data given from Python as one
    # set per client is kept as it is, whatever the setting, so the config alone cannot refuse it
    raise ValueError(f"data.partition = 'natural' needs a data set with writers or roles, not {config.name} (or "
                     "per-client data: data.source, or one set per client given from Python)")


def _lazy_spec(config: DataConfig, labels: np.ndarray) -> PartitionSpec:
    return partition_spec(config.partition, labels, config.num_clients, shards_per_client=config.shards_per_client,
                          alpha=config.alpha, examples_per_client=config.examples_per_client, seed=config.seed)


def load_federated(config: DataConfig) -> ClientSets:
    if config.source:
        if config.lazy and Path(config.source).is_dir():  # read each client's file when it is asked for
            test = Path(config.source) / "test.npz"
            return ClientFolder(Path(config.source), config.num_clients, config.eval_fraction, config.seed,
                                labelled_file(test, "data.source") if test.exists() else None)
        return federated_from_user_data(config, load_user_data(config.source))
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if config.name in TEXT_SETS:
        return _load_shakespeare(config, cache_dir)
    arrays = load_image_set(config.name, config.path or None, cache_dir)
    if config.lazy:
        return LazyFederatedData(images_to_tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
                                 images_to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"]),
                                 _lazy_spec(config, arrays["train_y"]), config.eval_fraction, config.seed, 10)
    parts = _image_parts(config, arrays["train_y"])
    return FederatedData(  # the training images stay uint8, each client's made float when asked for
        torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
        images_to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"]),
        parts, config.eval_fraction, config.seed, num_classes=10, convert_x=images_to_tensor,
    )


def _load_shakespeare(config: DataConfig, cache_dir: Path | None) -> FederatedData:
    """One client per role (`natural`), or the same roles' training examples dealt evenly among as many clients
    (`iid`, the FedAvg paper's balanced IID version). Characters: windows of SEQ_LEN characters -> the next one;
    words: data/shakespeare_words.py. 10% of each role's examples (the last ones, as LEAF splits by time) form the
    central test set."""
    if config.name == "shakespeare_words":
        arrays = words.load_shakespeare_words(config.path or None, cache_dir)
        text = torch.from_numpy(arrays["tokens"].astype(np.int64))
        num_classes, window = words.VOCAB_SIZE, words.WINDOW
    else:
        arrays = load_shakespeare(config.path or None, cache_dir)
        text = torch.from_numpy(arrays["text"].astype(np.int64))
        num_classes, window = len(VOCAB), SEQ_LEN
    offsets = arrays["offsets"]
    xs, ys, test_x, test_y = [], [], [], []
    for role in np.random.default_rng(config.seed).permutation(len(offsets) - 1):
        tokens = text[offsets[role] : offsets[role + 1]]
        if config.name == "shakespeare_words":
            train_x, train_y, role_test_x, role_test_y = words.role_examples(tokens, config.max_examples_per_client)
        else:
            train_x, train_y, role_test_x, role_test_y = _char_examples(tokens, config.max_examples_per_client)
        if not len(train_y):
            continue  # a role whose every next word is out of the vocabulary
        xs.append(train_x)
        ys.append(train_y)
        test_x.append(role_test_x)
        test_y.append(role_test_y)
        if len(xs) == config.num_clients:
            break
    if len(xs) < config.num_clients:
        raise ValueError(f"data.num_clients = {config.num_clients}, but {config.name} has {len(xs)} roles with "
                         "enough lines")
    sizes = np.cumsum([0] + [len(y) for y in ys])
    if config.partition == "iid":
        parts = partition.iid(int(sizes[-1]), config.num_clients, config.seed)
    else:
        parts = [np.arange(sizes[k], sizes[k + 1]) for k in range(len(ys))]
    return FederatedData(torch.cat(xs), torch.cat(ys), torch.cat(test_x), torch.cat(test_y), parts,
                         config.eval_fraction, config.seed, num_classes=num_classes,
                         held_out_last=config.partition == "natural", window=window)


def _char_examples(text: torch.Tensor, max_examples: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One role's windows of SEQ_LEN characters -> the next character: (train_x, train_y, test_x, test_y)."""
    windows = text.unfold(0, SEQ_LEN + 1, 1)  # a view, no copy
    if max_examples:
        windows = windows[:max_examples]
    cut = max(1, int(len(windows) * 0.9))
    train = windows[: max(1, cut - SEQ_LEN)]  # a gap of SEQ_LEN windows: no character in both splits
    return train[:, :SEQ_LEN], train[:, SEQ_LEN], windows[cut:, :SEQ_LEN], windows[cut:, SEQ_LEN]


def federated_from_user_data(config: DataConfig, data: UserData) -> ClientSets:
    """The user's data as FederatedData (or LazyFederatedData, `config.lazy`): per-client sets kept as they are
    (`natural`), one pooled set partitioned."""
    if data.clients is not None:
        if config.num_clients > len(data.clients):
            raise ValueError(f"data.num_clients = {config.num_clients}, but data.source has {len(data.clients)} "
                             "clients")
        clients = data.clients[: config.num_clients]
        empty = [k for k, c in enumerate(clients) if len(c) == 0]
        if empty:
            raise ValueError(f"data.source: clients {empty[:10]} have no examples")
        pooled = concat_labelled(clients)
        runs = ContiguousRuns(np.array([len(c) for c in clients]))
        spec: PartitionSpec = runs
    else:
        assert data.pooled is not None
        pooled = data.pooled
        labels = pooled.y.numpy()
        if config.partition in ("shards", "dirichlet") and pooled.y.is_floating_point():
            raise ValueError(f"data.partition = {config.partition!r} skews labels and needs integer class labels; "
                             "use 'iid' or 'quantity' for regression targets")
        if config.partition == "natural":
            raise ValueError("data.partition = 'natural' needs per-client data (a folder of client files, or a "
                             "loader returning one set per client)")
        spec = _lazy_spec(config, labels) if config.lazy else _Parts(_image_parts(config, labels))
    test = data.test or Labelled(take(pooled.x, slice(0, 0)), pooled.y[:0])
    classification = not pooled.y.is_floating_point()
    if classification and len(pooled.y) and int(pooled.y.min()) < 0:
        raise ValueError("data.source: class labels must be >= 0")
    num_classes = int(max(pooled.y.max(), test.y.max() if len(test.y) else 0)) + 1 if classification else 0
    if config.lazy:
        return LazyFederatedData(pooled.x, pooled.y, test.x, test.y, spec, config.eval_fraction, config.seed,
                                 num_classes)
    parts = [spec.indices(k) for k in range(spec.num_clients)]
    return FederatedData(pooled.x, pooled.y, test.x, test.y, parts, config.eval_fraction, config.seed,
                         num_classes=num_classes)


class _Parts:
    """A partition already made, as a spec."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts, self.num_clients = parts, len(parts)

    def indices(self, client: int) -> np.ndarray:
        return self.parts[client]


def load_test_set(config: DataConfig) -> tuple[Inputs, torch.Tensor, int] | None:
    """The network server's own test set (x, y, number of classes), reading no client's data: `data.test_path`,
    the built-in set's test split, or None when the run's data is the users' own without a test_path."""
    if config.test_path:
        test = labelled_file(Path(config.test_path), "data.test_path")
        return test.x, test.y, 0 if test.y.is_floating_point() else int(test.y.max()) + 1 if len(test.y) else 0
    if config.source:
        return None
    if config.name in TEXT_SETS:
        data = load_federated(config)
        return data.test_x, data.test_y, data.num_classes
    arrays = load_image_set(config.name, config.path or None, Path(config.cache_dir) if config.cache_dir else None)
    return images_to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"]), 10


def load_own_data(config: DataConfig, client_id: int, path: str = "") -> tuple[Labelled, Labelled, int]:
    """One network client's (training set, held-out set, number of classes): a .npz file or a folder holding
    `data.npz` given on its command line; else `data.source`'s loader called with `client_id=`; else (trying things
    out on one machine) partition `client_id` of the configured data set. The held-out share is
    `data.eval_fraction`."""
    if not path and not (config.source and is_reference(config.source) and accepts(config.source, "client_id")):
        everyone = load_federated(config)
        if client_id >= everyone.num_clients:
            raise ValueError(f"--id {client_id}: data.num_clients is {everyone.num_clients}")
        return (Labelled(*everyone.client_train(client_id)), Labelled(*everyone.client_eval(client_id)),
                everyone.num_classes)
    if path:
        file = Path(path) / "data.npz" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ValueError(f"--data-path {path!r}: no such file (a .npz with x and y, or a folder with data.npz)")
        own = labelled_file(file, "--data-path")
    else:
        own = as_labelled(call_loader(config.source, client_id=client_id), f"data.source for client {client_id}")
    if len(own) == 0:
        raise ValueError(f"client {client_id}: its data holds no examples")
    classes = 0 if own.y.is_floating_point() else int(own.y.max()) + 1
    split = FederatedData(own.x, own.y, take(own.x, slice(0, 0)), own.y[:0], [np.arange(len(own))],
                          config.eval_fraction, config.seed, classes)
    return Labelled(*split.client_train(0)), Labelled(*split.client_eval(0)), classes
