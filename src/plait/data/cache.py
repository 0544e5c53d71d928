"""Arrays decoded once from their source (a pickle, IDX files, plays to parse), then read back from a cache folder
as memory-mapped .npy files: no pickle, no decoding, no copy until a page is used.

    <cache_dir>/<name>-<key>/<array>.npy   one file per array (allow_pickle=False both ways)
    <cache_dir>/<name>-<key>/manifest.json the sources' identity, each array's dtype, shape and CRC-32

`key` hashes the sources' identity (resolved path, size, modification time of every file), so a changed or moved
source builds a new cache; the cache of the files before they changed is removed. Every load checks the manifest,
each file's size and each array's CRC-32 (about 15 ms for MNIST): a truncated, damaged or half-written cache is
built anew, never read. A cache is written into a temporary folder renamed into place, so a reader sees all of it
or none; one that cannot be written (a read-only disk) is a warning, and the data is decoded again next time.

Where: `data.cache_dir`, else $PLAIT_CACHE, else ~/.cache/plait; "off" in either builds from the source every time
and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

FORMAT = 1        # bump when the layout changes: older caches are then rebuilt, not misread
OFF = "off"       # data.cache_dir / $PLAIT_CACHE value that turns the cache off
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait"))


def cache_root(cache_dir: Path | str | None) -> Path | None:
    """The cache folder for a `cache_dir` setting ("" or None: $PLAIT_CACHE, then ~/.cache/plait); None when off."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return None if str(root) == OFF else root


def source_identity(sources: Sequence[Path]) -> list[list[str | int]]:
    """[path, size, mtime_ns] of each source file, and of every file under each source folder (sorted)."""
    identity: list[list[str | int]] = []
    for source in sources:
        source = Path(source).resolve()
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for file in files:
            stat = file.stat()
            identity.append([str(file), stat.st_size, stat.st_mtime_ns])
    return identity


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]], cache_dir: Path | str | None = None,
                  sources: Sequence[Path] = ()) -> dict[str, np.ndarray]:
    """The arrays `build()` returns, from `<cache_dir>/<name>-<key>/` when a valid cache of the same `sources` is
    there, else built and cached. Loaded arrays are copy-on-write memory maps: writing to one never reaches the
    file."""
    root = cache_root(cache_dir)
    if root is None:
        return build()
    identity = source_identity(sources)
    key = hashlib.sha1(json.dumps([FORMAT, name, identity]).encode()).hexdigest()[:12]
    folder = root / f"{name}-{key}"
    arrays = _read(folder, identity)
    if arrays is not None:
        return arrays
    arrays = build()
    try:
        _write(folder, identity, arrays)
        _remove_older(root, name, folder, identity)
    except OSError as err:  # a read-only or full disk: the run goes on, decoding again next time
        warnings.warn(f"data cache {folder} could not be written ({err}); set data.cache_dir or PLAIT_CACHE to a "
                      "writable folder, or to 'off'", stacklevel=2)
    return arrays


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _read(folder: Path, identity: list[list[str | int]]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the folder is missing, stale or damaged in any way."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("sources") != identity:
            return None
        arrays = {}
        for key, meta in manifest["arrays"].items():
            path = folder / f"{key}.npy"
            mapped = np.load(path, mmap_mode="c", allow_pickle=False)
            if (mapped.dtype.str != meta["dtype"] or list(mapped.shape) != meta["shape"]
                    or path.stat().st_size != mapped.offset + mapped.nbytes or _crc(mapped) != meta["crc32"]):
                return None
            arrays[key] = mapped.view(np.ndarray)  # a plain array; the map stays open as its base
        return arrays
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable, not what we wrote
        return None


def _write(folder: Path, identity: list[list[str | int]], arrays: dict[str, np.ndarray]) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict = {"format": FORMAT, "sources": identity, "arrays": {}}
    for key, array in arrays.items():
        assert re.fullmatch(r"\w+", key), f"array name {key!r} is not a file name"
        np.save(tmp / f"{key}.npy", array, allow_pickle=False)
        manifest["arrays"][key] = {"dtype": array.dtype.str, "shape": list(array.shape), "crc32": _crc(array)}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    if folder.exists():  # damaged (a valid one was read above): moved aside, then removed
        aside = folder.with_name(f".{folder.name}.old{os.getpid()}")
        try:
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass  # another process moved it first
    try:
        os.rename(tmp, folder)  # atomic; fails when another process put its (identical) cache there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_older(root: Path, name: str, keep: Path, identity: list[list[str | int]]) -> None:
    """Caches of the same name built from the same files before they changed: they would only take disk space.
    (Another copy of the data elsewhere, say a second virtual environment, keeps its own cache.)"""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{12}")
    paths = [entry[0] for entry in identity]
    for entry in root.iterdir():
        if entry == keep or not pattern.fullmatch(entry.name) or not entry.is_dir():
            continue
        try:
            theirs = [source[0] for source in json.loads((entry / MANIFEST).read_text())["sources"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            theirs = paths  # unreadable: a damaged cache of ours
        if theirs == paths:
            shutil.rmtree(entry, ignore_errors=True)


def path_key(prefix: str, path: Path) -> str:
    """A cache name stable across processes for data read from a user's directory."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"
