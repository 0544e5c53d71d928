"""Simulated heterogeneous devices: each client has a compute speed, a bandwidth, a latency and an availability
over time; a round has a deadline; a virtual clock says what time it is.

The server keeps the first `target` clients to report before the deadline; later ones (the over-selected surplus and
the stragglers) are dropped and counted. A fast simulator decides who is late before training, and skips them.

Availability (FedScale's habit): `always`; `diurnal`, each client online `online_hours` of every 24 hours from a
phase of its own; or `trace`, windows read from a CSV file with lines `client_id,start_h,end_h` (hours on the
virtual clock, repeating every `trace_period_h`; 0: once). Only clients online when a round starts can be selected.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from plait.federated.seeds import DEVICE_SPEEDS, DEVICE_STATES, stream


@dataclass(kw_only=True, slots=True)
class DeviceConfig:
    speed_sigma: float = 0.0        # log-normal spread of client compute speed (0: all equal)
    step_time_s: float = 0.01       # simulated seconds per local step on a speed-1.0 device
    bandwidth_mbps: float = 0.0     # mean link speed, for transfer time (0: transfers take no time)
    deadline_s: float = 0.0         # round deadline in simulated seconds (0: wait for the target count)
    p_charging: float = 1.0         # per-round probability that a device reports each property
    p_idle: float = 1.0
    p_unmetered: float = 1.0
    latency_ms: float = 0.0         # mean one-way latency (log-normal per client), paid on download and upload
    availability: Literal["always", "diurnal", "trace"] = "always"
    online_hours: float = 8.0       # diurnal: hours online in every 24
    trace_file: str = ""            # trace: a CSV of client_id,start_h,end_h windows
    trace_period_h: float = 24.0    # trace: the windows repeat with this period (0: they happen once)
    retry_s: float = 60.0           # a round that finds too few clients online costs this much simulated time

    def __post_init__(self) -> None:
        if self.speed_sigma < 0 or self.step_time_s <= 0 or self.bandwidth_mbps < 0 or self.deadline_s < 0:
            raise ValueError("devices: speed_sigma, bandwidth_mbps, deadline_s must be >= 0 and step_time_s > 0")
        if self.latency_ms < 0 or not 0 < self.online_hours <= 24 or self.trace_period_h < 0 or self.retry_s <= 0:
            raise ValueError("devices: latency_ms and trace_period_h must be >= 0, online_hours in (0, 24], "
                             "retry_s > 0")
        if self.availability == "trace" and not self.trace_file:
            raise ValueError("devices.availability = 'trace' needs devices.trace_file")
        for name in ("p_charging", "p_idle", "p_unmetered"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"devices.{name} must be a probability in [0, 1]")


class DevicePool:
    """Fixed per-client speeds and bandwidths (seeded), plus per-round device states."""

    def __init__(self, config: DeviceConfig, num_clients: int, seed: int):
        self.config = config
        rng = stream(seed, DEVICE_SPEEDS)
        self.speed = rng.lognormal(0.0, config.speed_sigma, num_clients) if config.speed_sigma else np.ones(num_clients)
        self.bandwidth = (rng.lognormal(0.0, 0.5, num_clients) * config.bandwidth_mbps
                          if config.bandwidth_mbps else np.full(num_clients, np.inf))
        self.seed = seed
        # drawn after the speeds and bandwidths, so adding latency or availability leaves those as they were
        self.latency_s = (rng.lognormal(0.0, 0.5, num_clients) * config.latency_ms / 1000 if config.latency_ms
                          else np.zeros(num_clients))
        self.phase_h = rng.uniform(0.0, 24.0, num_clients)
        self.windows = read_trace(Path(config.trace_file), num_clients) if config.availability == "trace" else None

    def online(self, clock_s: float) -> np.ndarray:
        """Which clients are online at `clock_s` on the virtual clock (a boolean per client)."""
        c, hour = self.config, clock_s / 3600
        if c.availability == "always":
            return np.ones(len(self.speed), dtype=bool)
        if c.availability == "diurnal":
            return (hour - self.phase_h) % 24.0 < c.online_hours
        assert self.windows is not None
        at = hour % c.trace_period_h if c.trace_period_h else hour
        up = np.zeros(len(self.speed), dtype=bool)
        for cid, start, end in self.windows:
            up[cid] |= start <= at < end
        return up

    def properties(self, round_idx: int) -> dict[int, dict[str, bool]]:
        rng = stream(self.seed, DEVICE_STATES, round_idx)
        draws = rng.random((len(self.speed), 3))
        c = self.config
        return {cid: {"charging": bool(d[0] < c.p_charging), "idle": bool(d[1] < c.p_idle),
                      "unmetered": bool(d[2] < c.p_unmetered)} for cid, d in enumerate(draws)}

    def finish_time(self, client: int, num_steps: int, bytes_down: int, bytes_up: int) -> float:
        transfer = (bytes_down + bytes_up) * 8 / (self.bandwidth[client] * 1e6) + 2 * self.latency_s[client]
        return num_steps * self.config.step_time_s / self.speed[client] + transfer


def split_on_time(finish_times: dict[int, float], target: int, deadline_s: float) -> tuple[list[int], list[int]]:
    """(kept, dropped): the first `target` clients to finish within the deadline are kept."""
    order = sorted(finish_times, key=lambda cid: (finish_times[cid], cid))
    on_time = [cid for cid in order if not deadline_s or finish_times[cid] <= deadline_s]
    kept = sorted(on_time[:target])
    dropped = sorted(set(order) - set(kept))
    return kept, dropped


def read_trace(path: Path, num_clients: int) -> list[tuple[int, float, float]]:
    """Availability windows (client, start_h, end_h) from a CSV file, checked."""
    if not path.is_file():
        raise ValueError(f"devices.trace_file = {str(path)!r} does not exist")
    windows = []
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].strip().startswith("#") or row[0].strip() == "client_id":
                continue
            try:
                cid, start, end = int(row[0]), float(row[1]), float(row[2])
            except (ValueError, IndexError) as err:
                raise ValueError(f"devices.trace_file line {number}: expected client_id,start_h,end_h, "
                                 f"got {row}") from err
            if not 0 <= cid < num_clients or not 0 <= start < end:
                raise ValueError(f"devices.trace_file line {number}: client {cid} (of {num_clients}), window "
                                 f"[{start}, {end}) hours")
            windows.append((cid, start, end))
    return windows
