"""The IDX format of MNIST and Fashion-MNIST: 2 zero bytes, a dtype byte, ndim, big-endian uint32 sizes, data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` as IDX (used by tests and by users converting their own data)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    if array.dtype not in codes:
        raise ValueError(f"write_idx supports uint8/int8, got {array.dtype}")
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def find_idx_pair(directory: Path, prefix: str) -> tuple[Path, Path]:
    """Locate `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` in `directory`."""
    directory = Path(directory)
    found = []
    for kind, dims in (("images", 3), ("labels", 1)):
        candidates = [directory / f"{prefix}-{kind}-idx{dims}-ubyte{ext}" for ext in ("", ".gz")]
        candidates += [directory / f"{prefix}-{kind}.idx{dims}-ubyte{ext}" for ext in ("", ".gz")]
        hit = next((c for c in candidates if c.exists()), None)
        if hit is None:
            raise FileNotFoundError(f"no {prefix} {kind} IDX file in {directory} "
                                    f"(looked for {candidates[0].name}[.gz])")
        found.append(hit)
    return found[0], found[1]
