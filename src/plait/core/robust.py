"""Byzantine-robust aggregation rules as pure functions on a stacked `[num_clients, dim]` tensor of updates.

- `coordinate_median`: per coordinate, the median (the mean of the two middle values for an even count).
- `trimmed_mean(trim)`: per coordinate, drop the `trim` largest and `trim` smallest values, average the rest
  (Yin et al. 2018).
- `krum(num_byzantine)`: the update whose summed squared distance to its n − f − 2 nearest neighbours is smallest
  (Blanchard et al. 2017); `multi_krum(num_byzantine, num_selected)` averages the m best-scored updates.
These rules weigh every client equally: a client's claimed example count is exactly what an attacker would inflate.
"""

from __future__ import annotations

import torch


def _check(updates: torch.Tensor, rule: str) -> int:
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"{rule}: expected a non-empty [num_clients, dim] tensor, got shape {tuple(updates.shape)}")
    return updates.shape[0]


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    _check(updates, "median")
    # torch.median returns the lower middle value; quantile(0.5) averages the two middle ones, as np.median does.
    return torch.quantile(updates, 0.5, dim=0) if updates.shape[0] % 2 == 0 else updates.median(dim=0).values


def trimmed_mean(updates: torch.Tensor, trim: int) -> torch.Tensor:
    num_clients = _check(updates, "trimmed_mean")
    if trim < 0 or 2 * trim >= num_clients:
        raise ValueError(f"trimmed_mean: cannot trim {trim} from each end of {num_clients} updates")
    ordered = updates.sort(dim=0).values
    return ordered[trim : num_clients - trim].mean(dim=0)


def krum_scores(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Per update: the sum of squared distances to its n − f − 2 nearest other updates."""
    num_clients = _check(updates, "krum")
    neighbours = num_clients - num_byzantine - 2
    if num_byzantine < 0 or neighbours < 1:
        raise ValueError(f"krum needs num_clients >= num_byzantine + 3, got {num_clients} clients and "
                         f"num_byzantine = {num_byzantine}")
    dist = torch.cdist(updates, updates).square()
    dist.fill_diagonal_(float("inf"))  # exclude each update's distance to itself
    return dist.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def multi_krum(updates: torch.Tensor, num_byzantine: int, num_selected: int) -> torch.Tensor:
    """The mean of the `num_selected` updates with the lowest Krum scores (1: plain Krum)."""
    num_clients = _check(updates, "multi_krum")
    if not 1 <= num_selected <= num_clients:
        raise ValueError(f"multi_krum: num_selected must be in [1, {num_clients}], got {num_selected}")
    best = krum_scores(updates, num_byzantine).topk(num_selected, largest=False).indices
    return updates[best].mean(dim=0)


def krum(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    return multi_krum(updates, num_byzantine, 1)
