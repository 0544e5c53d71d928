"""Client selection: a fraction C of the registered clients, at least `min_clients`, drawn only from the clients whose
reported properties pass the eligibility predicate (e.g. charging, idle, on an unmetered network).

Two ways, one distribution (uniform without replacement over the eligible clients):

- from a listing (`Mapping` of every candidate's properties): the eligible are listed and sampled; cost and memory
  grow with the candidates. The network's connected clients, and the simulator's up to `devices.selection`'s limit.
- from a `Population` too large to list (a million simulated devices): ids are drawn at random and checked one by
  one until the round's cohort is full (rejection sampling), so the cost grows with the cohort; the eligible count
  is then an estimate from the ids checked, exact when there are no eligibility rules. Should eligible clients be
  too rare to find that way, one exact pass over the population decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Properties = Mapping[str, Any]
TRIES_PER_PICK = 32  # a population's ids checked per wanted client before one exact pass decides


def share_of(fraction: float, total: int) -> int:
    """ceil(fraction · total), immune to float error (0.07 · 100 is 7.000000000000001, which must give 7)."""
    return math.ceil(fraction * total - 1e-9)


def target_clients(fraction: float, min_clients: int, num_registered: int) -> int:
    """How many reports a round needs: C · registered clients, at least the quorum."""
    return max(min_clients, share_of(fraction, num_registered))


@dataclass(frozen=True, slots=True)
class Requires:
    """An eligibility predicate: every named property must equal the wanted value. Its rules are data, so a
    population can apply them to arrays of every client's states at once."""
    wanted: dict[str, Any] = field(default_factory=dict)

    def __call__(self, props: Properties) -> bool:
        return all(props.get(key) == value for key, value in self.wanted.items())


def requires(**wanted: Any) -> Requires:
    return Requires(dict(wanted))


class Population(Protocol):
    """Registered clients too many to list, each one's online state and properties found on demand."""

    @property
    def num_registered(self) -> int: ...

    def num_online(self) -> int: ...

    def properties_of(self, client: int) -> Properties | None:
        """The client's properties this round; None when it is offline."""
        ...

    def eligible_ids(self, eligible: Callable[[Properties], bool]) -> np.ndarray:
        """Every online client passing `eligible`, sorted: the exact pass, for when they are rare."""
        ...


@dataclass(frozen=True, slots=True)
class Selection:
    selected: list[int]   # sampled clients, over-selection included
    target: int           # how many reports the round needs (C · num_registered, at least min_clients)
    num_eligible: int


def select_clients(candidates: Mapping[int, Properties] | Population, fraction: float, min_clients: int,
                   over_selection: float, eligible: Callable[[Properties], bool],
                   rng: np.random.Generator) -> Selection:
    """Sample without replacement from the eligible candidates (a listing, or a `Population`). Returns an empty
    selection when fewer than `min_clients` are eligible: the round cannot reach its quorum and is skipped."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if over_selection < 0:
        raise ValueError(f"over_selection must be >= 0, got {over_selection}")
    if not isinstance(candidates, Mapping):
        return _sample_population(candidates, fraction, min_clients, over_selection, eligible, rng)
    pool = sorted(cid for cid, props in candidates.items() if eligible(props))
    return _choose(pool, target_clients(fraction, min_clients, len(candidates)), min_clients, over_selection, rng)


def _choose(pool: list[int], target: int, min_clients: int, over_selection: float,
            rng: np.random.Generator) -> Selection:
    if len(pool) < max(min_clients, 1):
        return Selection([], target, len(pool))
    wanted = min(len(pool), share_of(1 + over_selection, target))
    chosen = rng.choice(len(pool), size=wanted, replace=False)
    return Selection(sorted(pool[i] for i in chosen), min(target, len(pool)), len(pool))


def _sample_population(population: Population, fraction: float, min_clients: int, over_selection: float,
                       eligible: Callable[[Properties], bool], rng: np.random.Generator) -> Selection:
    """Rejection sampling: draw ids uniformly, skip the ones seen, offline or ineligible, until `wanted` are found;
    each accepted id is uniform over the eligible ones not yet chosen, so the cohort is a uniform sample."""
    online, registered = population.num_online(), population.num_registered
    target = target_clients(fraction, min_clients, online)
    wanted = share_of(1 + over_selection, target)
    if not online or not wanted:  # nobody to find: the round is skipped, as with an empty listing
        return Selection([], target, 0)
    tries = min(registered, TRIES_PER_PICK * wanted + 1024)
    seen: set[int] = set()
    chosen: list[int] = []
    checked_online = 0
    while len(chosen) < wanted and len(seen) < tries:
        for cid in rng.integers(0, registered, size=wanted).tolist():
            if cid in seen:
                continue
            seen.add(cid)
            props = population.properties_of(cid)
            if props is None:
                continue
            checked_online += 1
            if eligible(props):
                chosen.append(cid)
                if len(chosen) == wanted:
                    break
    if len(chosen) < wanted:  # eligible clients are rare (or few): one exact pass over the population
        return _choose(population.eligible_ids(eligible).tolist(), target, min_clients, over_selection, rng)
    no_rules = isinstance(eligible, Requires) and not eligible.wanted
    # (found - 1) / (checked - 1): the unbiased share when checking stops at the found-th eligible client
    share = (wanted - 1) / (checked_online - 1) if wanted > 1 else wanted / checked_online
    num_eligible = online if no_rules else max(wanted, round(online * share))
    return Selection(sorted(chosen), target, num_eligible)
