"""Spawn N local ranks joined in one torch.distributed process group (gloo on CPU), reachable from this host only.

`spawn_ranks(fn, nproc, *args)` runs `fn(rank, world_size, *args)` in each rank after the group is initialised and
returns the ranks' return values in rank order. The first rank to fail, or the timeout, ends every rank, and the
error names the rank; a run that diverged (`Diverged`, which every rank raises at the same step) is re-raised as
such, once every rank has stopped. Under torchrun the same `fn` is run with `run_from_env`, which reads the env://
rendezvous (torchrun's store, runtime/torchrun_env.py: see docs/security.md).

The spawned ranks open no port beyond loopback: they meet through a `FileStore` in a private temporary directory
(0700: no TCP listener, and no other local user can join), and gloo (NCCL for its bootstrap) is bound to the
loopback interface.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.parallel.device import rank_device
from plait.runtime.divergence import Diverged
from plait.runtime.torchrun_env import attempt_prefix, torchrun_store, under_torchrun

__all__ = ["attempt_prefix", "default_backend", "group_restarted", "run_from_env", "spawn_ranks", "under_torchrun"]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def loopback_interface() -> str:
    """The name of this host's loopback interface ("lo" on Linux, "lo0" on macOS and the BSDs)."""
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise RuntimeError(f"no loopback interface among {names}: cannot keep the local ranks on 127.0.0.1")


def _rank_main(rank: int, world_size: int, store_path: str, backend: str, threads: int, results, fn: Callable,
               args: tuple):
    # RANK and LOCAL_RANK as torchrun sets them (the device choice reads LOCAL_RANK); no MASTER_ADDR: nothing
    # listens for the rendezvous, the ranks meet through the store file.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    loopback = loopback_interface()
    os.environ.update(GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback)  # every rank is on this host
    if threads:
        torch.set_num_threads(threads)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        value = fn(rank, world_size, *args)
        # pickled here, by value: the queue's own pickler would pass a tensor as a handle to this process's shared
        # memory, gone once the rank exits and before the parent reads it
        results.put((rank, "ok", pickle.dumps(value)))
    except Diverged as err:  # every rank stops at the same step: the parent says so once, with rank 0's message
        results.put((rank, "diverged", str(err)))
    except BaseException as err:  # report every failure, with where it happened
        results.put((rank, "error", (f"{type(err).__name__}: {err}", isinstance(err, ValueError), str(err),
                                     traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    """A spawned rank raised. `setting` is True for a ValueError, which in Plait names a setting that does not fit
    (a batch larger than the data, fp16 on a CPU): a caller can say `message` alone, as for a config error, where
    the rank's traceback (in str()) is for a failure of the code."""

    def __init__(self, rank: int, what: str, setting: bool, message: str, trace: str):
        super().__init__(f"rank {rank} failed: {what}\n{trace}")
        self.rank, self.setting, self.message = rank, setting, message


def spawn_ranks(fn: Callable[..., Any], nproc: int, *args: Any, backend: str | None = None, timeout_s: float = 120.0,
                threads_per_rank: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `nproc` fresh processes; `fn` and args must be picklable."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    store_dir = tempfile.mkdtemp(prefix="plait-ranks-")  # 0700: only this user's processes can join
    store_path = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, nproc, store_path, backend or default_backend(), threads_per_rank, results, fn,
                               args))
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    diverged: dict[int, str] = {}
    try:
        while len(values) + len(diverged) < nproc:
            if not results.empty():
                rank, status, value = results.get()
                if status == "error":
                    raise RankFailed(rank, *value)
                if status == "diverged" and not diverged:
                    # the others stop at the same step: let them finish (rank 0 writes the run's last record)
                    deadline = min(deadline, time.monotonic() + 30.0)
                if status == "ok":
                    values[rank] = pickle.loads(value)
                else:
                    diverged[rank] = value
                continue
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and results.empty():
                time.sleep(0.2)  # give a failing rank's message time to arrive
                if results.empty():
                    raise RuntimeError(f"rank {procs.index(dead[0])} exited with code {dead[0].exitcode}")
                continue
            if time.monotonic() > deadline:
                if diverged:
                    break
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s (done: {sorted(values)})")
            time.sleep(0.01)
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(values) + len(diverged) == nproc else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        shutil.rmtree(store_dir, ignore_errors=True)
    if diverged:
        raise Diverged(diverged[min(diverged)])
    return [values[rank] for rank in range(nproc)]


def run_from_env(fn: Callable[..., Any], *args: Any, backend: str | None = None) -> Any:
    """Run one rank under torchrun (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)."""
    store, rank, world_size = torchrun_store(timeout_s=120.0)
    dist.init_process_group(backend or default_backend(), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        return fn(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def group_restarted() -> bool:
    """Whether torchrun restarted this group (collective: every rank calls it). Each agent counts only the restarts
    its own workers' failures caused (one whose workers were healthy restarts them uncounted when another node's
    failed), so the ranks agree by the largest count any of them sees."""
    count = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], dtype=torch.int64,
                         device=rank_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count) > 0
