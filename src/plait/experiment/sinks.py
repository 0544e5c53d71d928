"""Where a run's metrics go: one record per round or step, written to every sink of the run directory.

    metrics.jsonl   the record as it is (what `plait plot` and `plait compare` read)
    metrics.csv     the same records as a table, one column per metric seen so far
    tb/             TensorBoard event files: every number against the step (`tensorboard --logdir runs` shows every
                    run of every plane), and, where a run counts its traffic (bytes_up, bytes_down), against the
                    cumulative kilobytes sent (tags `vs_kB/...`)

A plane writes through `MetricSinks.write(record)` and never knows which sinks exist. On resume the sinks start
where the (truncated) metrics.jsonl ends: the CSV is rebuilt from it and TensorBoard purges the redone steps.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Protocol

from plait.runtime.checkpoint import atomic_write_bytes
from plait.runtime.metrics_log import MetricsLog, read_metrics

TRAFFIC_KEYS = ("bytes_up", "bytes_down")  # summed into the cumulative kB axis of TensorBoard's vs_kB/ tags


class MetricSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class CsvSink:
    """metrics.csv: one row per record; a record with a new metric rewrites the file with the wider header."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        for record in read_metrics(self.path.with_suffix(".jsonl")):  # what the log keeps (resume)
            self._remember(record)
        self._rewrite()

    def _remember(self, record: dict[str, Any]) -> bool:
        new = [k for k in record if k not in self.columns and not isinstance(record[k], (list, dict))]
        self.columns += new
        self.rows.append(record)
        return bool(new)

    def _rewrite(self) -> None:
        text = _table(self.columns, self.rows).encode("utf-8")
        atomic_write_bytes(self.path, lambda f: f.write(text))

    def write(self, record: dict[str, Any]) -> None:
        if self._remember(record) or not self.path.exists():
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(_cells(record))

    def close(self) -> None:
        pass


def _cells(record: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if v is None else v) for k, v in record.items() if not isinstance(v, (list, dict))}


def _table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_cells(row))
    return out.getvalue()


class TensorBoardSink:
    """Scalars for TensorBoard, written by PyTorch's own `SummaryWriter`, made at the first record: importing it
    takes 0.1-0.15 s, which a run would otherwise spend before its first round (the sinks before this one, the
    metrics.jsonl among them, have the record by then)."""

    def __init__(self, log_dir: Path, step_key: str, resume_after: int | None):
        self.log_dir, self.step_key, self.resume_after = Path(log_dir), step_key, resume_after
        self._writer: Any = None
        self.total_bytes = 0.0
        if resume_after is not None:
            for record in read_metrics(self.log_dir.parent / "metrics.jsonl"):
                self.total_bytes += sum(_number(record.get(k)) or 0.0 for k in TRAFFIC_KEYS)

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a crashed run wrote after its checkpoint are hidden; the resumed run writes them anew
            purge = None if self.resume_after is None else self.resume_after + 1
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        return self._writer

    def write(self, record: dict[str, Any]) -> None:
        step = record.get(self.step_key)
        if not isinstance(step, int):
            return
        traffic = [_number(record.get(k)) for k in TRAFFIC_KEYS]
        counts_traffic = any(t is not None for t in traffic)
        self.total_bytes += sum(t or 0.0 for t in traffic)
        for key, value in record.items():
            number = _number(value)
            if number is None or key == self.step_key:
                continue
            self.writer.add_scalar(key, number, step)
            if counts_traffic and key not in TRAFFIC_KEYS:  # the curves against communication spent
                self.writer.add_scalar(f"vs_kB/{key}", number, int(self.total_bytes / 1e3))
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricSinks:
    """Every sink of a run, as one: `write(record)` reaches each of them."""

    def __init__(self, run_path: Path, step_key: str, *, resume_after: int | None = None,
                 tensorboard: bool = True):
        run_path = Path(run_path)
        self.sinks: list[MetricSink] = [MetricsLog(run_path / "metrics.jsonl"), CsvSink(run_path / "metrics.csv")]
        if tensorboard:
            self.sinks.append(TensorBoardSink(run_path / "tb", step_key, resume_after))

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
