"""Secure aggregation settings (`[fl.strategy.secagg]`): threshold, neighbour graph, fixed-point encoding.

The ring is Z_{2^modulus_bits}. A client's update is clipped per coordinate to [-clip, clip], multiplied by its
weight n_k (FedAvg) and rounded to an integer at `scale` steps per unit, so the sum of `num_clients` such values
must fit in half the ring (the upper half encodes negatives). `modulus_bits = 0` picks the smallest ring that
holds that sum, which is also what keeps the traffic small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class SecAggConfig:
    threshold: float = 0.5           # t = max(2, ceil(threshold * (degree + 1))) shares reconstruct a secret
    graph: Literal["complete", "harary"] = "complete"   # complete: SecAgg (Bonawitz 2017); harary: SecAgg+ (Bell 2020)
    neighbours: int = 0              # harary only: k neighbours per client (0: 2 * ceil(log2 n)); rounded up to even
    clip: float = 1.0                # per-coordinate clip of the update before fixed-point encoding
    scale: float = 2.0 ** 16         # fixed-point steps per unit: the quantisation error is <= 0.5 / scale
    max_weight: int = 10_000         # largest n_k a client may send (FedAvg weight); bounds the ring's headroom
    modulus_bits: int = 0            # ring Z_{2^bits}; 0: the smallest that holds the sum (at most 62)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"secagg.threshold must be in (0, 1], got {self.threshold}")
        if self.neighbours < 0:
            raise ValueError(f"secagg.neighbours must be >= 0, got {self.neighbours}")
        if self.neighbours and self.graph != "harary":
            raise ValueError("secagg.neighbours is only used with secagg.graph = \"harary\" (SecAgg+)")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"secagg.clip must be a positive finite number, got {self.clip}")
        if not (self.scale >= 1 and math.isfinite(self.scale)):
            raise ValueError(f"secagg.scale must be >= 1, got {self.scale}")
        if self.max_weight < 1:
            raise ValueError(f"secagg.max_weight must be >= 1, got {self.max_weight}")
        if self.modulus_bits and not 8 <= self.modulus_bits <= 62:
            raise ValueError(f"secagg.modulus_bits must be 0 (auto) or in [8, 62], got {self.modulus_bits}")

    def check_weights(self, largest: int) -> None:
        """Fail at start, naming the key, when a client's n_k would not fit the ring's headroom."""
        if largest > self.max_weight:
            raise ValueError(f"fl.strategy.secagg.max_weight = {self.max_weight} is below the largest client's "
                             f"{largest} examples; raise it (or use strategy.weighting = 'uniform')")

    def ring_bits(self, num_clients: int, max_weight: int) -> int:
        """Bits of the ring for a round of `num_clients` whose weights are <= `max_weight` (1 when uniform).

        ValueError if the configured ring is too small.
        """
        max_abs = max(round(max_weight * self.clip * self.scale), max_weight)
        # The signed sum must lie in [-(2^(bits-1) - 1), 2^(bits-1) - 1].
        needed = max(8, (num_clients * max_abs).bit_length() + 1)
        if needed > 62:
            raise ValueError(f"secagg: {num_clients} clients x max_weight {max_weight} x clip {self.clip} x "
                             f"scale {self.scale} needs a {needed}-bit ring (> 62); lower secagg.scale or max_weight")
        if self.modulus_bits and self.modulus_bits < needed:
            raise ValueError(f"secagg.modulus_bits = {self.modulus_bits} is too small for {num_clients} clients "
                             f"(needs {needed}); raise it, set it to 0 (auto), or lower scale / max_weight / clip")
        return self.modulus_bits or needed

    def threshold_of(self, holders: int) -> int:
        """Shares needed to rebuild one client's secrets when `holders` clients (itself included) hold them."""
        return min(holders, max(2, math.ceil(self.threshold * holders - 1e-9)))

    def degree(self, num_clients: int) -> int:
        """Neighbours of each client in a round of `num_clients`."""
        if self.graph == "complete":
            return num_clients - 1
        k = self.neighbours or 2 * math.ceil(math.log2(max(num_clients, 2)))
        k += k % 2
        return min(k, num_clients - 1)
