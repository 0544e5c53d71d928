"""The user's own data for federated runs, named by `data.source`:

- a reference to a function, `"package.module:load"` or `"file.py:load"`, returning a labelled set to partition
  (`(x, y)`, a dict with `x` and `y` and optionally `test_x`, `test_y`, or a map-style `torch.utils.data.Dataset`),
  or per-client sets (a list, or a dict from client id to a set) that are the partition itself;
- a `.npz` file with arrays `x`, `y` (and optionally `test_x`, `test_y`), partitioned by `data.partition`;
- a folder of per-client files `client-0.npz`, `client-1.npz`, ... (each `x`, `y`), and optionally `test.npz`.

Inputs may be one tensor or a tuple of tensors (a model with several inputs). Labels are integer classes for a
classification task (the label-skew partitioners need them) or floats for regression. Arrays are read with
`allow_pickle=False`: a data file never runs code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(slots=True)
class Labelled:
    x: Inputs
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(slots=True)
class UserData:
    pooled: Labelled | None          # one set, partitioned by data.partition
    clients: list[Labelled] | None   # the partition itself, one set per client
    test: Labelled | None


def take(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    """The examples `index` of one input tensor, or of each of several."""
    return tuple(x[index] for x in inputs) if isinstance(inputs, tuple) else inputs[index]


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{what}: an array of Python objects; give numbers")
        return torch.from_numpy(value)
    raise ValueError(f"{what}: expected a tensor or an array, got {type(value).__name__}")


def _inputs(value: Any, what: str) -> Inputs:
    if isinstance(value, (tuple, list)):
        return tuple(_tensor(v, f"{what}[{i}]") for i, v in enumerate(value))
    return _tensor(value, what)


def as_labelled(value: Any, what: str) -> Labelled:
    """(x, y), {"x": ..., "y": ...}, a Labelled, or a map-style Dataset of (x, y) pairs, checked."""
    if isinstance(value, Labelled):
        out = value
    elif isinstance(value, dict) and "x" in value and "y" in value:
        out = Labelled(_inputs(value["x"], f"{what} x"), _tensor(value["y"], f"{what} y"))
    elif isinstance(value, (tuple, list)) and len(value) == 2:  # (x, y); x may be a tuple of several inputs
        out = Labelled(_inputs(value[0], f"{what} x"), _tensor(value[1], f"{what} y"))
    elif hasattr(value, "__getitem__") and hasattr(value, "__len__"):  # a map-style Dataset
        out = _stack_dataset(value, what)
    else:
        raise ValueError(f"{what}: expected (x, y), a dict with x and y, or a Dataset; got {type(value).__name__}")
    lengths = {len(t) for t in (out.x if isinstance(out.x, tuple) else (out.x,))}
    if lengths != {len(out.y)}:
        raise ValueError(f"{what}: {sorted(lengths)} inputs but {len(out.y)} labels")
    return out


def _stack_dataset(dataset: Any, what: str) -> Labelled:
    if len(dataset) == 0:
        raise ValueError(f"{what}: the Dataset is empty")
    items = [dataset[i] for i in range(len(dataset))]
    try:
        xs, ys = zip(*items)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: a Dataset's items must be (x, y) pairs") from err
    first = xs[0]
    if isinstance(first, (tuple, list)):
        x: Inputs = tuple(torch.stack([torch.as_tensor(item[i]) for item in xs]) for i in range(len(first)))
    else:
        x = torch.stack([torch.as_tensor(item) for item in xs])
    return Labelled(x, torch.stack([torch.as_tensor(label) for label in ys]))


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.exists():
        raise ValueError(f"{what} = {str(path)!r}: no such file{_from_where(path)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err


def labelled_file(path: Path, what: str) -> Labelled:
    arrays = read_npz(path, what)
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"{what}: {path} must hold arrays 'x' and 'y', it has {sorted(arrays)}")
    return as_labelled({"x": arrays["x"], "y": arrays["y"]}, f"{what} ({path})")


def _client_files(folder: Path) -> list[Path]:
    pattern = re.compile(r"client-(\d+)\.npz")
    found = {int(m.group(1)): f for f in folder.glob("client-*.npz") if (m := pattern.fullmatch(f.name))}
    if not found:
        raise ValueError(f"data.source = {str(folder)!r}: no client-<id>.npz files in the folder")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ValueError(f"data.source = {str(folder)!r}: client files must be numbered from 0; missing {missing[:5]}")
    return [found[k] for k in sorted(found)]


def call_loader(source: str, **kwargs: Any) -> Any:
    """What the user's loader `data.source` returns, called with `kwargs`; what it raises names the setting."""
    from plait.user_code import resolve_callable

    loader = resolve_callable(source, "data.source", kwargs)
    try:
        return loader(**kwargs)
    except Exception as err:
        raise ValueError(f"data.source = {source!r} failed: {type(err).__name__}: {err}") from err


def load_user_data(source: str) -> UserData:
    from plait.user_code import is_reference

    if is_reference(source):
        return user_data_from(call_loader(source), f"data.source = {source!r}")
    path = Path(source)
    if path.is_dir():
        clients = [labelled_file(f, "data.source") for f in _client_files(path)]
        test = labelled_file(path / "test.npz", "data.source") if (path / "test.npz").exists() else None
        return UserData(None, clients, test)
    if path.suffix == ".npz" and path.is_file():
        arrays = read_npz(path, "data.source")
        if "x" not in arrays or "y" not in arrays:
            raise ValueError(f"data.source: {path} must hold arrays 'x' and 'y', it has {sorted(arrays)}")
        test = as_labelled({"x": arrays["test_x"], "y": arrays["test_y"]}, "data.source test") \
            if "test_x" in arrays and "test_y" in arrays else None
        return UserData(as_labelled({"x": arrays["x"], "y": arrays["y"]}, "data.source"), None, test)
    if not path.exists():
        raise ValueError(f"data.source = {source!r}: no such file or folder{_from_where(path)}")
    raise ValueError(f"data.source = {source!r} is neither a reference ('package.module:load'), a .npz file, nor "
                     "a folder of client-<id>.npz files")


def _from_where(path: Path) -> str:
    """For a relative path not found: where it was looked for (data files follow the current directory, while a
    `file.py:name` reference follows the config's folder: an example's `clients/` is written where plait runs)."""
    return "" if path.is_absolute() else f" (a relative path is taken from the current directory, {Path.cwd()})"


def user_data_from(loaded: Any, what: str) -> UserData:
    if isinstance(loaded, UserData):
        return loaded
    if isinstance(loaded, dict) and loaded and all(isinstance(k, int) for k in loaded):
        ids = sorted(loaded)
        if ids != list(range(len(ids))):
            raise ValueError(f"{what}: per-client data must be keyed 0..n-1, got {ids[:5]}...")
        return UserData(None, [as_labelled(loaded[k], f"{what} client {k}") for k in ids], None)
    if isinstance(loaded, list) and loaded and not isinstance(loaded[0], torch.Tensor) \
            and not (len(loaded) == 2 and isinstance(loaded[1], (torch.Tensor, np.ndarray))):
        return UserData(None, [as_labelled(v, f"{what} client {k}") for k, v in enumerate(loaded)], None)
    test = None
    if isinstance(loaded, dict) and "test_x" in loaded and "test_y" in loaded:
        test = as_labelled({"x": loaded["test_x"], "y": loaded["test_y"]}, f"{what} test set")
    return UserData(as_labelled(loaded, what), None, test)


def concat_labelled(sets: list[Labelled]) -> Labelled:
    """One set of several (each input column concatenated)."""
    columns = [s.x if isinstance(s.x, tuple) else (s.x,) for s in sets]
    stacked = tuple(torch.cat([c[i] for c in columns]) for i in range(len(columns[0])))
    return Labelled(stacked if isinstance(sets[0].x, tuple) else stacked[0], torch.cat([s.y for s in sets]))


def load_training_set(source: str, test_path: str = "") -> tuple[Labelled, Labelled | None]:
    """The user's data as one training set, for the cluster planes (which split it among their ranks themselves):
    per-client sets are concatenated. The test set is `test_path`'s, else the source's own, else None (no test
    metrics). One input tensor per example: a model with several inputs is the federated plane's for now."""
    data = load_user_data(source)
    if data.clients is not None:
        if not data.clients:
            raise ValueError(f"data.source = {source!r} holds no clients")
        train = concat_labelled(data.clients)
    else:
        assert data.pooled is not None
        train = data.pooled
    test = labelled_file(Path(test_path), "data.test_path") if test_path else data.test
    for what, part in (("data.source", train), ("data.test_path" if test_path else "data.source's test set", test)):
        if part is not None and isinstance(part.x, tuple):
            raise ValueError(f"{what}: {len(part.x)} input tensors per example; the cluster planes (data parallel, "
                             "pipeline, parameter server) take one")
    if len(train) == 0:
        raise ValueError(f"data.source = {source!r} holds no training examples")
    return train, test
