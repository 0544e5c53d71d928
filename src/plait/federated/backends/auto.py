"""`fl.executor = "auto"`: a short measurement at start-up picks how simulated clients run.

One client's local training is timed for a few steps, and its whole local run estimated from its plan. A worker
pool pays a fixed cost per task (the task out, the update back: a few milliseconds, `POOL_TASK_S`) and gains one
core per worker; so the pool is chosen when a client's run is long enough for that cost to vanish
(`POOL_WORTH_S`) and there is more than one core, and the sequential simulator otherwise (small models are
overhead-bound). The choice and its reason are logged and written into the run's config.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, client_update
from plait.federated.plan import TrainingPlan
from plait.federated.task import Task

POOL_TASK_S = 0.005      # measured per-task cost of the process pool on a 2-core machine (benchmarks/fl_simulator.py)
POOL_WORTH_S = 0.05      # a client run this long makes that cost < 10%
MEASURE_STEPS = 5


def choose_executor(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
                    plan: TrainingPlan, task: Task, cores: int | None = None) -> tuple[str, str]:
    """("sequential" | "process_pool", why) for clients like `data` training `plan`."""
    cores = cores or os.cpu_count() or 1
    model = copy.deepcopy(model)  # measuring must not move the run's model (BatchNorm statistics, for one)
    probe = replace(plan, max_steps=MEASURE_STEPS)
    client_update(model, spec, params, data, probe, task)  # warm-up: first-call costs are not the workload's
    started = time.perf_counter()
    client_update(model, spec, params, data, probe, task)
    per_step = (time.perf_counter() - started) / min(MEASURE_STEPS, probe.num_steps(len(data)))
    per_client = per_step * plan.num_steps(len(data))
    if cores < 2:
        return "sequential", f"one core: a pool has nothing to add ({per_client * 1000:.1f} ms a client)"
    if per_client < POOL_WORTH_S:
        return "sequential", (f"a client's run takes {per_client * 1000:.1f} ms, too short for a pool's "
                              f"{POOL_TASK_S * 1000:.0f} ms per task")
    return "process_pool", (f"a client's run takes {per_client * 1000:.0f} ms: {cores} workers, one per core, "
                            f"pay {POOL_TASK_S * 1000:.0f} ms per task")
