"""The simulated devices of one round as a `selection.Population`: who is online at the round's start on the virtual
clock and each client's states, found per client on demand, so selecting a cohort from a million registered clients
costs what the cohort costs (`devices.selection = "sample"`, the default past `SCAN_UP_TO` clients)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from plait.federated.selection import Properties, Requires
from plait.federated.stragglers import DevicePool


class DevicePopulation:
    def __init__(self, devices: DevicePool, round_idx: int, clock_s: float):
        self.devices, self.round_idx, self.clock_s = devices, round_idx, clock_s

    @property
    def num_registered(self) -> int:
        return self.devices.num_clients

    def num_online(self) -> int:
        return self.devices.num_online(self.clock_s)

    def properties_of(self, client: int) -> Properties | None:
        if not self.devices.is_online(client, self.clock_s):
            return None
        return self.devices.properties_of(client, self.round_idx)

    def eligible_ids(self, eligible: Callable[[Properties], bool]) -> np.ndarray:
        """One pass over every client: vectorised for `requires(...)` rules, one call per online client otherwise."""
        online = self.devices.online(self.clock_s)
        if isinstance(eligible, Requires):
            states = self.devices.property_arrays(self.round_idx)
            for name, value in eligible.wanted.items():
                online &= (states[name] == value) if name in states else False  # as props.get(name) == value
            return np.flatnonzero(online)
        ids = np.flatnonzero(online)
        keep = [eligible(self.devices.properties_of(int(cid), self.round_idx)) for cid in ids]
        return ids[np.array(keep, dtype=bool)]
