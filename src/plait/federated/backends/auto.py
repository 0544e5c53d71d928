"""`fl.executor = "auto"`: a short measurement at start-up picks how simulated clients run.

One client's local training is timed for 1 and for 1 + MEASURE_STEPS steps, the best of a few repeats each, on one
thread (as a pool worker runs): the difference gives the cost of a step, the rest the client's fixed cost (copying
the weights in, the optimizer, the delta out), and its whole local run is the fixed cost plus its plan's steps.
Timing only a few steps and scaling them up counted the fixed cost once per step, and one noisy repeat on a loaded
machine could read 100x the real figure (a 0.2 s client estimated at 20 s).

A short client (under `POOL_WORTH_S`) is overhead-bound: Python holds the GIL between its small kernels, so threads
gain nothing, and a worker pool gains a core per worker less a small cost per task (`POOL_TASK_S`) after a start of
`POOL_START_S` (forked workers start in hundredths of a second, spawned ones in seconds). The pool is chosen when
the run's rounds and cohort make that start pay, the sequential simulator otherwise. For a longer client, threads in
this process cost no per-task transfer and hold torch and the data once, but gain cores only where kernels, not
Python, take the time (they release the GIL): two clients are timed on two threads against one after the other, and
threads are chosen when they run at least `THREADS_WORTH` times as fast (and the model draws no random numbers,
which threads could not seed apart), the process pool otherwise. The choice and its reason are logged and written
into the run's config.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, client_update
from plait.federated.executor import ClientTask, torch_threads
from plait.federated.plan import TrainingPlan
from plait.federated.task import Task
from plait.federated.thread_executor import draws_random_numbers

POOL_TASK_S = 0.0003     # a pool task's cost beyond the sequential executor's: 100 six-step 2NN clients a round took
                         # 0.30 s on 2 workers, 0.42 s one after the other (benchmarks/RESULTS.md)
POOL_START_S = {"fork": 0.05,   # starting 2 workers and their first tasks, 2 cores: forked, 0.05 s
                "spawn": 1.5}   # spawned (each imports torch and takes the model): 1.3-1.6 s
POOL_WORTH_S = 0.05      # a client run this long: the pool or threads whatever the run's length
THREADS_WORTH = 1.3      # two threads must do this many clients' work in one client's time to beat the pool
THREADS_GAIN = 1.2       # the sequential executor trains on every thread only when that is this much faster than one
                         # (best-of timings hide the spread of multi-threaded runs of tiny ops: a 2NN's steps timed
                         # alike on 1 and 2 threads here, and its rounds took two to three times as long on 2)
SPEEDUP_REPEATS = 5
MEASURE_STEPS = 5
REPEATS = 3

Choice = Literal["sequential", "threads", "process_pool"]


def choose_executor(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
                    plan: TrainingPlan, task: Task, cores: int | None = None, *, clients_per_round: int = 1,
                    rounds: int = 1, pool_start: Literal["fork", "spawn"] = "spawn") -> tuple[Choice, str]:
    """("sequential" | "threads" | "process_pool", why) for a run of `rounds` rounds of `clients_per_round`
    clients like `data` training `plan`, where a pool's workers would start by `pool_start`."""
    cores = cores or os.cpu_count() or 1
    model = copy.deepcopy(model)  # measuring must not move the run's model (BatchNorm statistics, for one)
    steps = plan.num_steps(len(data))
    short, long = replace(plan, max_steps=1), replace(plan, max_steps=1 + MEASURE_STEPS)
    measured = min(MEASURE_STEPS, steps - 1)
    with torch_threads(1):
        client_update(model, spec, params, data, long, task)  # warm-up: first-call costs are not the workload's
        one = _best_time(lambda: client_update(model, spec, params, data, short, task))
        more = _best_time(lambda: client_update(model, spec, params, data, long, task)) if measured > 0 else one
    per_step = max(more - one, 0.0) / measured if measured > 0 else one
    per_client = max(one - per_step, 0.0) + per_step * steps
    if cores < 2:
        return "sequential", f"one core: a pool has nothing to add ({per_client * 1000:.1f} ms a client)"
    if per_client < POOL_WORTH_S:
        per_round = clients_per_round * (per_client * (1 - 1 / cores) - POOL_TASK_S)
        start = POOL_START_S[pool_start]
        saved = rounds * per_round - start
        run = (f"a client's run takes {per_client * 1000:.1f} ms (too short for threads); {cores} workers would "
               f"save {max(per_round, 0) * 1000:.0f} ms a round of {clients_per_round}")
        started = f"their {start} s start ({pool_start})"
        if saved > 0:
            return "process_pool", f"{run}: {saved:.2f} s over {rounds} rounds, after {started}"
        return "sequential", f"{run}: too little over {rounds} rounds for {started}"
    speedup = _thread_speedup(model, spec, params, data, long, task)
    run = f"a client's run takes {per_client * 1000:.0f} ms"
    if speedup >= THREADS_WORTH:
        return "threads", (f"{run}; two threads train {speedup:.2f}x as fast as one: {cores} threads, one per core, "
                           "in this process")
    why = ("the model draws random numbers, which clients on threads cannot seed apart" if speedup == 0 else
           f"two threads train only {speedup:.2f}x as fast as one")
    return "process_pool", f"{run}; {why}: {cores} workers, one per core"


def training_threads(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
                     plan: TrainingPlan, task: Task) -> tuple[int, str]:
    """(torch threads, why) for training clients like `data` one after another in this process: 0 (leave the
    process's `torch.get_num_threads()`) when that many step at least THREADS_GAIN times as fast as one, else 1 (a
    small model's ops are too short to share: the other threads only wait)."""
    threads = torch.get_num_threads()
    if threads < 2:
        return 0, "one torch thread already"
    model = copy.deepcopy(model)
    steps = replace(plan, max_steps=1 + MEASURE_STEPS)
    timed = {}
    for count in (1, threads):
        with torch_threads(count):
            client_update(model, spec, params, data, steps, task)  # warm-up at this thread count
            timed[count] = _best_time(lambda: client_update(model, spec, params, data, steps, task))
    said = (f"{MEASURE_STEPS + 1} steps take {timed[1] * 1000:.1f} ms on 1 thread, "
            f"{timed[threads] * 1000:.1f} ms on {threads}")
    if timed[threads] * THREADS_GAIN <= timed[1]:
        return 0, f"{said}: clients train on {threads}"
    return 1, f"{said}: clients train on 1"


def _thread_speedup(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, data: ClientData,
                    plan: TrainingPlan, task: Task) -> float:
    """How many times as fast two threads, one torch thread each, train two clients as one thread trains one; 0
    for a model that draws random numbers."""
    if draws_random_numbers(model, ClientTask(0, plan, data, task)):
        return 0.0
    copies = [model, copy.deepcopy(model)]

    def train(i: int) -> None:
        torch.set_num_threads(1)
        client_update(copies[i], spec, params, data, plan, task, seed_global_rng=False)

    threads = torch.get_num_threads()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            list(pool.map(train, range(2)))  # warm-up
            one, both = float("inf"), float("inf")
            # one thread and two in turn, best of SPEEDUP_REPEATS each: a burst of load then falls on both sides
            # (timed apart, the same CNN read 1.26x in one run and 1.56x in the next)
            for _ in range(SPEEDUP_REPEATS):
                one = min(one, _best_time(lambda: train(0), repeats=1))
                both = min(both, _best_time(lambda: list(pool.map(train, range(2))), repeats=1))
        finally:
            torch.set_num_threads(threads)
    return 2 * one / both if both > 0 else 0.0


def _best_time(call: Callable[[], object], repeats: int = REPEATS) -> float:
    """The fastest of `repeats` runs: noise from other processes only ever adds time."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best
