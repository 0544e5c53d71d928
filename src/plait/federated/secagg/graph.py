"""Who masks with whom. SecAgg (Bonawitz et al. 2017) pairs every client with every other one: O(n) masks and
shares per client. SecAgg+ (Bell et al. 2020) uses a random k-regular Harary graph, k = O(log n): clients sit on
a ring in a seeded random order and each pairs with the k/2 nearest on either side, so work per client is O(log n)
while a server still learns only sums over large sets. The graph is public: clients and server derive it alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def neighbours(client_ids: Sequence[int], degree: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours (sorted); `degree` >= n - 1 gives the complete graph."""
    ids = sorted(client_ids)
    n = len(ids)
    if degree >= n - 1:
        return {cid: tuple(v for v in ids if v != cid) for cid in ids}
    if degree % 2:
        raise ValueError(f"secagg: a Harary graph needs an even degree, got {degree}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    out = {}
    for pos, cid in enumerate(order):
        near = {order[(pos + step) % n] for step in range(1, degree // 2 + 1)}
        near |= {order[(pos - step) % n] for step in range(1, degree // 2 + 1)}
        out[cid] = tuple(sorted(near))
    return out
