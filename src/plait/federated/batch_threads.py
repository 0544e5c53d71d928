"""`on_threads(work, count)`: `work(0) ... work(count - 1)` on this process's torch threads as Python threads, one
torch thread each, results in index order.

Evaluation on the CPU splits each batch's kernels over torch's threads, and a small batch's kernels split poorly: the
MNIST CNN's 10,000 test images took 3.3 s on two torch threads against 5.9 s on one (1.6x). Two Python threads, each
on one torch thread and its own batches, took 2.3 s: PyTorch releases the GIL inside its kernels. The 2NN's took 38
ms against 54 (medians, 2 cores; benchmarks/RESULTS.md). The caller adds the results up in index order, so a sum
has the same bits on any number of threads.

The threads share the caller's module: in eval mode under inference mode a forward pass only reads it (a module
that writes to itself in `forward` would race).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import TypeVar, cast

import torch

T = TypeVar("T")

_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}  # by size: made at first use, kept for the process
_pools_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child (the process pool's workers) has this process's pools and lock but none of their threads: a
    pool would take work that no thread runs, and the lock may have been held."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _threads(count: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        if count not in _pools:
            _pools[count] = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="plait-batch")
        return _pools[count]


def on_threads(work: Callable[[int], T], count: int) -> list[T]:
    """[work(i) for i in range(count)], shared among `torch.get_num_threads()` Python threads when there are two or
    more of each (one after the other otherwise), under inference mode, each on one torch thread."""
    threads = min(torch.get_num_threads(), count)
    if threads < 2:
        return [work(i) for i in range(count)]
    results: list[T | None] = [None] * count
    taken = iter(range(count))
    lock = threading.Lock()

    def drain() -> None:  # each thread takes the next index until none is left: a slow batch holds up no other
        torch.set_num_threads(1)
        with torch.inference_mode():
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                results[i] = work(i)

    main = torch.get_num_threads()
    try:
        running = [_threads(threads).submit(drain) for _ in range(threads)]
        concurrent.futures.wait(running)  # all of them, even after a failure: none may still use the caller's model
        for done in running:
            done.result()
    finally:
        torch.set_num_threads(main)  # a thread's set_num_threads(1) also set the count new threads inherit
    return cast(list[T], results)
