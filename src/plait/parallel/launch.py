"""Spawn N local ranks joined in one torch.distributed process group (gloo on CPU) on 127.0.0.1.

`spawn_ranks(fn, nproc, *args)` runs `fn(rank, world_size, *args)` in each rank after the group is initialised and
returns the ranks' return values in rank order. The first rank to fail, or the timeout, ends every rank, and the
error names the rank. Under torchrun the same `fn` is run with `run_from_env`, which reads the env:// rendezvous.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _rank_main(rank: int, world_size: int, port: int, backend: str, threads: int, results, fn: Callable, args: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    if threads:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException as err:  # report every failure, with where it happened
        results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], nproc: int, *args: Any, backend: str | None = None, timeout_s: float = 120.0,
                threads_per_rank: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `nproc` fresh processes; `fn` and args must be picklable."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, nproc, port, backend or default_backend(), threads_per_rank, results, fn, args))
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    try:
        while len(values) < nproc:
            if not results.empty():
                rank, status, value = results.get()
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed: {value}")
                values[rank] = value
                continue
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and results.empty():
                time.sleep(0.2)  # give a failing rank's message time to arrive
                if results.empty():
                    raise RuntimeError(f"rank {procs.index(dead[0])} exited with code {dead[0].exitcode}")
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s (done: {sorted(values)})")
            time.sleep(0.01)
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(values) == nproc else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [values[rank] for rank in range(nproc)]


def run_from_env(fn: Callable[..., Any], *args: Any, backend: str | None = None) -> Any:
    """Run one rank under torchrun (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"run_from_env needs torchrun's environment; missing {missing}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=120)
    # torchrun keeps the same store across restarts of the group; keys left by the dead attempt (ranks' old
    # addresses) would make the new one connect to dead sockets, so each attempt gets its own key prefix.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend or default_backend(), store=dist.PrefixStore(f"plait/attempt{attempt}", store),
                            rank=rank, world_size=world_size, timeout=timeout)
    try:
        return fn(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (its env:// rendezvous is set)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)
