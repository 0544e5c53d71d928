"""Follow a JSONL log as another process appends to it: each read returns only the lines added since the last one.

A line still being written (no newline yet) waits for the next read. A file that shrank or was replaced (a resumed
run's log is truncated by writing a new file over it, `runtime.metrics_log.truncate_metrics`) is read again from
its start, and the read says so: what the reader built from the old lines is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlTail:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._inode, self._offset = -1, 0  # read up to this byte (complete lines) of this file

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(the records appended since the last read, whether the file was replaced or truncated since: the
        records returned before are gone). A missing file has no records yet."""
        try:
            stat = self.path.stat()
        except OSError:
            return [], False
        restarted = stat.st_ino != self._inode or stat.st_size < self._offset
        if restarted:
            restarted = self._inode != -1  # the first read restarts nothing
            self._inode, self._offset = stat.st_ino, 0
        if stat.st_size == self._offset:
            return [], restarted
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(stat.st_size - self._offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a record (writers append whole lines; a crash may cut the last one)
            if isinstance(record, dict):
                records.append(record)
        return records, restarted
