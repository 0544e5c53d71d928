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
from typing import Any, Literal

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
    # how a round finds its clients: "scan" draws every registered client's state and lists the eligible (cost grows
    # with the registered clients); "sample" draws clients at random and checks them one by one (cost grows with the
    # cohort; the eligible count is then an estimate); "auto": scan up to SCAN_UP_TO registered clients
    selection: Literal["auto", "scan", "sample"] = "auto"

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


SCAN_UP_TO = 1000  # devices.selection = "auto": registered clients up to which a round scans them all
PROPERTIES = ("charging", "idle", "unmetered")  # a device's per-round states, one uniform draw each


def _same_for_all(value: float, num_clients: int) -> np.ndarray:
    """A per-client array holding one value, in no memory (a read-only broadcast view)."""
    return np.broadcast_to(np.float64(value), (num_clients,))


class DevicePool:
    """Fixed per-client speeds and bandwidths (seeded), plus per-round device states.

    Per-client figures are numpy arrays (8 bytes a client; none for a figure every client shares), never Python
    objects, so a million devices cost megabytes; a client's state in a round can be drawn alone
    (`properties_of`), the same as in the whole round's draw (`properties`)."""

    def __init__(self, config: DeviceConfig, num_clients: int, seed: int):
        self.config, self.num_clients = config, num_clients
        rng = stream(seed, DEVICE_SPEEDS)
        self.speed = (rng.lognormal(0.0, config.speed_sigma, num_clients) if config.speed_sigma
                      else _same_for_all(1.0, num_clients))
        self.bandwidth = (rng.lognormal(0.0, 0.5, num_clients) * config.bandwidth_mbps
                          if config.bandwidth_mbps else _same_for_all(np.inf, num_clients))
        self.seed = seed
        # drawn after the speeds and bandwidths, so adding latency or availability leaves those as they were
        self.latency_s = (rng.lognormal(0.0, 0.5, num_clients) * config.latency_ms / 1000 if config.latency_ms
                          else _same_for_all(0.0, num_clients))
        diurnal = config.availability == "diurnal"  # the last draw: skipping it changes nothing above
        self.phase_h = rng.uniform(0.0, 24.0, num_clients) if diurnal else _same_for_all(0.0, num_clients)
        self.windows = read_trace(Path(config.trace_file), num_clients) if config.availability == "trace" else None
        self._sorted_phases: np.ndarray | None = None
        self._round_states: tuple[int, Any] | None = None  # (round, generator state at its first draw)

    def online(self, clock_s: float) -> np.ndarray:
        """Which clients are online at `clock_s` on the virtual clock (a boolean per client)."""
        c, hour = self.config, clock_s / 3600
        if c.availability == "always":
            return np.ones(self.num_clients, dtype=bool)
        if c.availability == "diurnal":
            return (hour - self.phase_h) % 24.0 < c.online_hours
        assert self.windows is not None
        up = np.zeros(self.num_clients, dtype=bool)
        up[self.windows.open_at(self._trace_hour(hour))] = True
        return up

    def _trace_hour(self, hour: float) -> float:
        period = self.config.trace_period_h
        return hour % period if period else hour

    def is_online(self, client: int, clock_s: float) -> bool:
        """`online(clock_s)[client]`, for one client."""
        c, hour = self.config, clock_s / 3600
        if c.availability == "always":
            return True
        if c.availability == "diurnal":
            return bool((hour - self.phase_h[client]) % 24.0 < c.online_hours)
        assert self.windows is not None
        return self.windows.client_open_at(client, self._trace_hour(hour))

    def num_online(self, clock_s: float) -> int:
        """How many clients are online at `clock_s`, without a pass over every client where the availability allows:
        diurnal counts the phases in the window ending now (sorted once); a trace counts its open windows."""
        c, hour = self.config, clock_s / 3600
        if c.availability == "always":
            return self.num_clients
        if c.availability == "diurnal":
            if self._sorted_phases is None:
                self._sorted_phases = np.sort(self.phase_h)
            start, end = (hour - c.online_hours) % 24.0, hour % 24.0  # online: phase in (start, end], mod 24
            below = np.searchsorted(self._sorted_phases, [start, end], side="right")
            inside = int(below[1] - below[0])
            return inside if start < end else self.num_clients + inside  # the window wraps past midnight
        assert self.windows is not None
        return len(np.unique(self.windows.open_at(self._trace_hour(hour))))

    def properties(self, round_idx: int) -> dict[int, dict[str, bool]]:
        draws = stream(self.seed, DEVICE_STATES, round_idx).random((self.num_clients, len(PROPERTIES)))
        return {cid: self._states(d) for cid, d in enumerate(draws)}

    def property_arrays(self, round_idx: int) -> dict[str, np.ndarray]:
        """This round's states of every client, a boolean array per property (the draws of `properties`)."""
        draws = stream(self.seed, DEVICE_STATES, round_idx).random((self.num_clients, len(PROPERTIES)))
        limits = (self.config.p_charging, self.config.p_idle, self.config.p_unmetered)
        return {name: draws[:, j] < limit for j, (name, limit) in enumerate(zip(PROPERTIES, limits))}

    def properties_of(self, client: int, round_idx: int) -> dict[str, bool]:
        """`properties(round_idx)[client]`, drawn alone: the round's generator jumped ahead to the client's row
        (PCG64 advances in O(log n); a float64 takes one 64-bit output)."""
        if self._round_states is None or self._round_states[0] != round_idx:
            self._round_states = (round_idx, stream(self.seed, DEVICE_STATES, round_idx).bit_generator.state)
        start: Any = self._round_states[1]
        bits = np.random.PCG64(0)
        bits.state = start
        bits.advance(len(PROPERTIES) * client)
        return self._states(np.random.Generator(bits).random(len(PROPERTIES)))

    def _states(self, draws: np.ndarray) -> dict[str, bool]:
        c = self.config
        return {"charging": bool(draws[0] < c.p_charging), "idle": bool(draws[1] < c.p_idle),
                "unmetered": bool(draws[2] < c.p_unmetered)}

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


class TraceWindows:
    """Availability windows as arrays, sorted by client: who is open at an hour, in one vectorised pass over the
    windows (not the clients); one client's windows found by binary search."""

    def __init__(self, windows: list[tuple[int, float, float]]):
        table = np.array(windows, dtype=np.float64).reshape(-1, 3)
        table = table[np.argsort(table[:, 0], kind="stable")]
        self.client, self.start, self.end = table[:, 0].astype(np.int64), table[:, 1], table[:, 2]

    def open_at(self, hour: float) -> np.ndarray:
        """The clients with a window open at `hour` (a client may appear more than once)."""
        return self.client[(self.start <= hour) & (hour < self.end)]

    def client_open_at(self, client: int, hour: float) -> bool:
        lo, hi = np.searchsorted(self.client, [client, client + 1])
        return bool(((self.start[lo:hi] <= hour) & (hour < self.end[lo:hi])).any())


def read_trace(path: Path, num_clients: int) -> TraceWindows:
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
    return TraceWindows(windows)
