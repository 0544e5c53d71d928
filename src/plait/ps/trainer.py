"""A worker's training loop over the KVStore: pull weights, compute a gradient, push it, repeat.

The model's trainable parameters are one flat float32 key (key 0), as DDP's buckets: one message per piece (2 MiB
at most, see kvstore.py) per step. Worker r reads the r-th of N interleaved slices of the training set; the batch
of step t is drawn by a generator seeded with (seed, r, t), so a resumed worker draws the same batches it would have.
A step whose loss or gradient is not finite is never pushed: it stops the run or is skipped (divergence.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from plait.core.flat import FlatSpec, flat_params, split_views
from plait.core.models import build_model as build_preset
from plait.data.cluster import ClusterSets, load_cluster_sets
from plait.data.user import Labelled
from plait.ps.config import PSRunConfig
from plait.ps.divergence import WorkerDiverged, step_problem
from plait.ps.kvstore import KVStore
from plait.ps.security import LAUNCHER, CurveKeys
from plait.runtime.metrics_log import MetricsLog, elapsed_so_far, truncate_metrics
from plait.user_model import build_model, check_run_code, task_loss

PARAMS_KEY = 0
RESTART_ENV = "PLAIT_PS_WORKER_RESTART"  # set by the local launcher: how many times this worker was restarted


@dataclass(slots=True)
class Batches:
    x: torch.Tensor   # the built-in images: [N, 1, 28, 28] float32 in [0, 1]; the user's inputs as given
    y: torch.Tensor   # [N] class labels (int64), or float targets (train.task = "regression")


def _sets(config: PSRunConfig) -> ClusterSets:
    data = config.data
    return load_cluster_sets(name=data.name, path=data.path, source=data.source, test_path=data.test_path)


def _batches(sets: ClusterSets, part: Labelled, rank: int, num_workers: int, limit: int) -> Batches:
    assert isinstance(part.x, torch.Tensor)  # one input tensor (load_cluster_sets refuses several)
    x, y = part.x[rank::num_workers], part.y[rank::num_workers]
    if limit:
        x, y = x[:limit], y[:limit]
    return Batches(x.float().div_(255.0).unsqueeze(1) if sets.images else x, y)


def load_split(config: PSRunConfig, split: str, rank: int = 0, num_workers: int = 1, limit: int = 0) -> Batches:
    """Worker `rank`'s interleaved slice of the training set (split = "train"), or the test set ("test"; the
    user's data may have none: see load_test)."""
    sets = _sets(config)
    part = sets.train if split == "train" else sets.test
    if part is None:
        raise ValueError(f"data.source = {config.data.source!r} has no test split (give data.test_path)")
    return _batches(sets, part, rank, num_workers, limit)


def load_test(config: PSRunConfig) -> Batches | None:
    """The evaluator's fixed test subset (data.test_examples), or None: the user's data has no test split."""
    sets = _sets(config)
    return None if sets.test is None else _batches(sets, sets.test, 0, 1, config.data.test_examples)


def build_flat_model(config: PSRunConfig) -> tuple[torch.nn.Module, torch.Tensor, FlatSpec]:
    torch.manual_seed(config.run.seed)  # every worker builds the same initial weights
    model = build_model(config.model, preset=lambda: build_preset(config.model.name))
    flat, spec = flat_params(model)
    return model, flat.contiguous(), spec


def check_config_code(config: PSRunConfig) -> None:
    """At start, before the run directory: the user's model and data (when named) load, fit together and fit
    `train.task`'s loss; train.target_loss needs a test set. ValueError naming the setting otherwise."""
    if not (config.model.factory or config.data.source):
        return
    sets = _sets(config)
    if config.train.target_loss and sets.test is None:
        raise ValueError(f"train.target_loss needs a test set: data.source = {config.data.source!r} has none "
                         "(give data.test_path)")
    with torch.random.fork_rng(devices=[]):
        model, _, _ = build_flat_model(config)
    sample = _batches(sets, sets.train, 0, 1, 2)
    check_run_code(model, config.model, config.train.task, train_y=sets.train.y,
                   test_y=None if sets.test is None else sets.test.y, x=sample.x, y=sample.y,
                   num_classes=sets.num_classes)


def create_pieces(config: PSRunConfig, endpoints: list[str], backups: list[str] | None = None) -> None:
    """Store the model's initial pieces on the servers before any worker starts (the launcher's first step; an INIT
    as worker -1, counted in no clock). With sync.curve_keys only a control key may create pieces (trust.py), so
    this presents the launcher's; the workers' INITs then find the pieces and only read their clocks. Pieces a
    server already holds (a resumed run) stay as they are."""
    _, weights, _ = build_flat_model(config)
    sync = config.sync
    kv = KVStore(endpoints, -1, retry_s=sync.retry_s, timeout_s=sync.wait_timeout_s, piece_numel=sync.piece_numel,
                 curve_keys=CurveKeys.from_setting(sync.curve_keys, LAUNCHER), backups=backups or None)
    try:
        kv.init(PARAMS_KEY, weights)
    finally:
        kv.close(goodbye=False)


def loss_and_grad(model: torch.nn.Module, spec: FlatSpec, weights: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor, task: str = "classification") -> tuple[torch.Tensor, torch.Tensor]:
    w = weights.detach().requires_grad_(True)
    loss = task_loss(task)(functional_call(model, split_views(w, spec), (x,)), y)
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


@torch.no_grad()
def evaluate(model: torch.nn.Module, spec: FlatSpec, weights: torch.Tensor, data: Batches | None,
             task: str = "classification") -> dict[str, float]:
    """test_loss (and test_accuracy for classification) of `weights` on the test set; {} without one."""
    if data is None:
        return {}
    outputs = functional_call(model, split_views(weights, spec), (data.x,))
    metrics = {"test_loss": float(task_loss(task)(outputs, data.y))}
    if task == "classification":
        metrics["test_accuracy"] = float((outputs.argmax(1) == data.y).float().mean())
    return metrics


def wait_for_start(run_dir: Path, rank: int, timeout_s: float) -> None:
    """The local launcher's start barrier: say this worker is ready, wait for the go. Process start-up on a busy
    machine can differ by seconds between workers, which would otherwise count as (or hide) straggling."""
    (Path(run_dir) / f"ready-{rank}").touch()
    deadline = time.monotonic() + timeout_s
    while not (Path(run_dir) / "start").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"ps worker {rank}: no start signal after {timeout_s} s (stage: start barrier)")
        time.sleep(0.005)


def run_worker(config: PSRunConfig, rank: int, num_workers: int, endpoints: list[str], run_dir: Path,
               start_barrier: bool = False, backups: list[str] | None = None) -> None:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    restarted = int(os.environ.get(RESTART_ENV, "0")) > 0
    data = load_split(config, "train", rank, num_workers)
    model, weights, spec = build_flat_model(config)
    sync = config.sync
    kv = KVStore(endpoints, rank, retry_s=sync.retry_s, timeout_s=sync.wait_timeout_s, piece_numel=sync.piece_numel,
                 curve_keys=sync.curve_keys, backups=backups)
    kv.init(PARAMS_KEY, weights)
    first = kv.clock(PARAMS_KEY) + 1  # > 0 when the servers resumed from checkpoints
    if start_barrier:
        # Before the first pull: a resumed BSP worker whose clock is ahead of another's (a run stopped mid-clock)
        # pulls at a clock that waits for the other's push, which would wait here for it.
        wait_for_start(run_dir, rank, config.sync.wait_timeout_s)
    kv.wait(kv.pull(PARAMS_KEY, weights))
    log_path = Path(run_dir) / f"worker-{rank}.jsonl"
    started = time.perf_counter()
    if first:
        truncate_metrics(log_path, "step", first - 1)
        started -= elapsed_so_far(log_path)  # a resumed or restarted worker's clock goes on
    step = first
    logged_up = logged_down = 0  # the traffic counted so far: each record has what was sent and received since
    with MetricsLog(log_path) as log:
        while step < config.train.steps:
            if rank == config.fault.kill_worker and step == config.fault.kill_worker_at_step and not restarted:
                os._exit(3)  # an abrupt death: no goodbye, no flush, as a crash (once: not again after a restart)
            if rank == config.fault.stall_worker and step == config.fault.stall_at_step:
                time.sleep(config.fault.stall_s)  # a stalled worker (a long pause), alive but silent
            step_start = time.perf_counter()
            rng = np.random.default_rng([config.run.seed, rank, step])
            idx = torch.from_numpy(rng.integers(0, len(data.y), config.train.batch_size))
            loss, grad = loss_and_grad(model, spec, weights, data.x[idx], data.y[idx], config.train.task)
            if rank == config.fault.nan_worker and step == config.fault.nan_at_step:
                loss, grad = loss * math.nan, grad * math.nan  # an injected divergence
            problem = step_problem(loss, grad, weights)
            if problem is not None:
                text, skippable = problem
                if config.train.on_divergence == "stop" or not skippable:
                    message = (f"ps worker {rank}, step {step}: {text}; the run stops (train.on_divergence = "
                               f"'{config.train.on_divergence}': lower optimizer.lr, or set it to 'skip')")
                    log.write({"event": "diverged", "step": step, "worker": rank, "reason": message,
                               "time": time.time()})
                    kv.close(goodbye=False)
                    raise WorkerDiverged(message)
                kv.wait(kv.skip(PARAMS_KEY, weights))  # nothing pushed; the clock goes on with the others' gradients
                log.write({"step": step, "worker": rank, "skipped": text, "time": time.time(),
                           "elapsed_s": time.perf_counter() - started})
                step = max(step + 1, kv.clock(PARAMS_KEY) + 1)
                continue
            compute_s = time.perf_counter() - step_start
            pad_s = config.straggler.step_time(compute_s, rank, step, num_workers) - compute_s  # never negative
            if pad_s > 0:
                time.sleep(pad_s)  # an injected straggler, or an emulated device of fixed speed
            wait_before = kv.stats.wait_s
            # `grad` stays untouched until acknowledged; each piece's pull goes right behind its push.
            kv.wait(kv.pushpull(PARAMS_KEY, grad, weights))
            now = time.perf_counter()
            # One host sync per step, for the log only.
            log.write({"step": step, "worker": rank, "train_loss": float(loss), "staleness": kv.stats.last_staleness,
                       "compute_s": compute_s, "pad_s": pad_s, "wait_s": kv.stats.wait_s - wait_before,
                       "step_s": now - step_start, "time": time.time(), "elapsed_s": now - started,
                       "resends": kv.stats.resends, "bytes_up": kv.stats.bytes_sent - logged_up,
                       "bytes_down": kv.stats.bytes_received - logged_down})
            logged_up, logged_down = kv.stats.bytes_sent, kv.stats.bytes_received
            # Next clock; further on if the servers moved this worker on after it had been dropped (BSP, SSP).
            step = max(step + 1, kv.clock(PARAMS_KEY) + 1)
    kv.close()
