"""Simulated heterogeneous devices: each client has a compute speed and a bandwidth; a round has a deadline.

The server keeps the first `target` clients to report before the deadline; later ones (the over-selected surplus and
the stragglers) are dropped and counted. A fast simulator decides who is late before training, and skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        if self.speed_sigma < 0 or self.step_time_s <= 0 or self.bandwidth_mbps < 0 or self.deadline_s < 0:
            raise ValueError("devices: speed_sigma, bandwidth_mbps, deadline_s must be >= 0 and step_time_s > 0")
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

    def properties(self, round_idx: int) -> dict[int, dict[str, bool]]:
        rng = stream(self.seed, DEVICE_STATES, round_idx)
        draws = rng.random((len(self.speed), 3))
        c = self.config
        return {cid: {"charging": bool(d[0] < c.p_charging), "idle": bool(d[1] < c.p_idle),
                      "unmetered": bool(d[2] < c.p_unmetered)} for cid, d in enumerate(draws)}

    def finish_time(self, client: int, num_steps: int, bytes_down: int, bytes_up: int) -> float:
        transfer = (bytes_down + bytes_up) * 8 / (self.bandwidth[client] * 1e6)
        return num_steps * self.config.step_time_s / self.speed[client] + transfer


def split_on_time(finish_times: dict[int, float], target: int, deadline_s: float) -> tuple[list[int], list[int]]:
    """(kept, dropped): the first `target` clients to finish within the deadline are kept."""
    order = sorted(finish_times, key=lambda cid: (finish_times[cid], cid))
    on_time = [cid for cid in order if not deadline_s or finish_times[cid] <= deadline_s]
    kept = sorted(on_time[:target])
    dropped = sorted(set(order) - set(kept))
    return kept, dropped
