"""`fl.executor = "auto"`: a short measurement at start-up picks how simulated clients run.

One client's local training is timed for 1 and for 1 + MEASURE_STEPS steps, the best of a few repeats each, on one
thread (as a pool worker runs): the difference gives the cost of a step, the rest the client's fixed cost (copying
the weights in, the optimizer, the delta out), and its whole local run is the fixed cost plus its plan's steps.
Timing only a few steps and scaling them up counted the fixed cost once per step, and one noisy repeat on a loaded
machine could read 100x the real figure (a 0.2 s client estimated at 20 s). A worker
pool pays a fixed cost per task (the task out, the update back: a few milliseconds, `POOL_TASK_S`) and gains one
core per worker; so the pool is chosen when a client's run is long enough for that cost to vanish
(`POOL_WORTH_S`) and there is more than one core, and the sequential simulator otherwise (small models are
overhead-bound). The choice and its reason are logged and written into the run's config.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, client_update
from plait.federated.plan import TrainingPlan
from plait.federated.task import Task

POOL_TASK_S = 0.005      # measured per-task cost of the process pool on a 2-core machine (benchmarks/fl_simulator.py)
POOL_WORTH_S = 0.05      # a client run this long makes that cost < 10%
MEASURE_STEPS = 5
REPEATS = 3


def choose_executor(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
                    plan: TrainingPlan, task: Task, cores: int | None = None
                    ) -> tuple[Literal["sequential", "process_pool"], str]:
    """("sequential" | "process_pool", why) for clients like `data` training `plan`."""
    cores = cores or os.cpu_count() or 1
    model = copy.deepcopy(model)  # measuring must not move the run's model (BatchNorm statistics, for one)
    steps = plan.num_steps(len(data))
    short, long = replace(plan, max_steps=1), replace(plan, max_steps=1 + MEASURE_STEPS)
    measured = min(MEASURE_STEPS, steps - 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        client_update(model, spec, params, data, long, task)  # warm-up: first-call costs are not the workload's
        one = _best_time(lambda: client_update(model, spec, params, data, short, task))
        more = _best_time(lambda: client_update(model, spec, params, data, long, task)) if measured > 0 else one
    finally:
        torch.set_num_threads(threads)
    per_step = max(more - one, 0.0) / measured if measured > 0 else one
    per_client = max(one - per_step, 0.0) + per_step * steps
    if cores < 2:
        return "sequential", f"one core: a pool has nothing to add ({per_client * 1000:.1f} ms a client)"
    if per_client < POOL_WORTH_S:
        return "sequential", (f"a client's run takes {per_client * 1000:.1f} ms, too short for a pool's "
                              f"{POOL_TASK_S * 1000:.0f} ms per task")
    return "process_pool", (f"a client's run takes {per_client * 1000:.0f} ms: {cores} workers, one per core, "
                            f"pay {POOL_TASK_S * 1000:.0f} ms per task")


def _best_time(call: Callable[[], object]) -> float:
    """The fastest of REPEATS runs: noise from other processes only ever adds time."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best
