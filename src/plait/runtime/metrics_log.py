"""metrics.jsonl: one JSON object per step or round, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from plait.runtime.checkpoint import atomic_write_bytes


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the log
    return records


def last_logged(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The latest value of each of `keys` in the log (those it never recorded left out)."""
    found: dict[str, Any] = {}
    for record in read_metrics(path):
        found.update({key: record[key] for key in keys if key in record})
    return found


def truncate_metrics(path: Path, key: str, last: int) -> None:
    """Keep only records with `record[key] <= last`: on resume, steps after the checkpoint are redone, not doubled."""
    kept = [r for r in read_metrics(path) if r.get(key, -1) <= last]
    text = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
    atomic_write_bytes(Path(path), lambda f: f.write(text))  # a crash here must not lose the rounds kept


def last_number(path: Path, key: str) -> float | None:
    """The last number the log holds under `key` (None when no record has one)."""
    return next((float(r[key]) for r in reversed(read_metrics(path)) if isinstance(r.get(key), (int, float))), None)


def elapsed_so_far(path: Path) -> float:
    """The last `elapsed_s` a (truncated, resumed) log holds: where a resumed run's clock goes on from, so that
    `elapsed_s` stays the run's training time across stops."""
    return last_number(path, "elapsed_s") or 0.0
