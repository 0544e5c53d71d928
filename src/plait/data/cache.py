"""The .npz cache: arrays are loaded once from their source, then from `cache_dir` with allow_pickle=False."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    return Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait"))


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]],
                  cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Return the arrays cached as `<cache_dir>/<name>.npz`, building and writing them on first use."""
    path = Path(cache_dir or default_cache_dir()) / f"{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a reader never sees half a cache file
    return arrays


def path_key(prefix: str, path: Path) -> str:
    """A cache name stable across processes for data read from a user's directory."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"
