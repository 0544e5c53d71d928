"""Client selection: a fraction C of the registered clients, at least `min_clients`, drawn only from the clients whose
reported properties pass the eligibility predicate (e.g. charging, idle, on an unmetered network)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Properties = Mapping[str, Any]


def share_of(fraction: float, total: int) -> int:
    """ceil(fraction · total), immune to float error (0.07 · 100 is 7.000000000000001, which must give 7)."""
    return math.ceil(fraction * total - 1e-9)


def target_clients(fraction: float, min_clients: int, num_registered: int) -> int:
    """How many reports a round needs: C · registered clients, at least the quorum."""
    return max(min_clients, share_of(fraction, num_registered))


def requires(**wanted: Any) -> Callable[[Properties], bool]:
    """An eligibility predicate: every named property must equal the wanted value."""
    def eligible(props: Properties) -> bool:
        return all(props.get(key) == value for key, value in wanted.items())

    return eligible


@dataclass(frozen=True, slots=True)
class Selection:
    selected: list[int]   # sampled clients, over-selection included
    target: int           # how many reports the round needs (C · num_registered, at least min_clients)
    num_eligible: int


def select_clients(properties: Mapping[int, Properties], fraction: float, min_clients: int, over_selection: float,
                   eligible: Callable[[Properties], bool], rng: np.random.Generator) -> Selection:
    """Sample without replacement from the eligible clients. Returns an empty selection when fewer than
    `min_clients` are eligible: the round cannot reach its quorum and is skipped."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if over_selection < 0:
        raise ValueError(f"over_selection must be >= 0, got {over_selection}")
    pool = sorted(cid for cid, props in properties.items() if eligible(props))
    target = target_clients(fraction, min_clients, len(properties))
    if len(pool) < max(min_clients, 1):
        return Selection([], target, len(pool))
    wanted = min(len(pool), share_of(1 + over_selection, target))
    chosen = rng.choice(len(pool), size=wanted, replace=False)
    return Selection(sorted(pool[i] for i in chosen), min(target, len(pool)), len(pool))
