"""Start-up of the `plait` process: heavy imports without the cyclic garbage collector, and glibc's malloc arenas
capped.

Imports.

Importing torch and a plane creates about 200 000 objects that live as long as the process. While they are being
made the collector runs again and again over all of them (0.2-0.4 s of a simulation's start-up, measured with
`gc.callbacks`), and finds almost nothing to free. Python's documented pattern for long-lived start-up state
(`gc.freeze`) avoids that: collect nothing while importing, then move what the imports made to the permanent
generation, which later collections skip. The price: the few cycles the imports dropped are frozen too, never freed
(about 7 000 objects, 0.7 MB, for the simulator).

Arenas. glibc gives each thread that allocates its own malloc arena, up to 8 a core, and an arena keeps what its
thread freed. The simulator's threads (clients on threads, evaluation batches on threads: federated/batch_threads.py)
each kept a CNN batch's activations and scratch: the CNN run's peak went from 705 to 824-904 MB. Two arenas, the
main one and one the threads share, kept it at 682-685 MB with no slower rounds (benchmarks/RESULTS.md). The command
sets that limit as `MALLOC_ARENA_MAX=2` would, unless the environment sets MALLOC_ARENA_MAX itself; from Python, set
the variable before starting the interpreter.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_ARENA_MAX = -8   # mallopt's parameter number for the arena limit (glibc's malloc.h)
ARENAS = 2


def cap_malloc_arenas() -> bool:
    """Limit glibc's malloc to ARENAS arenas for the threads made from now on, unless MALLOC_ARENA_MAX is set;
    whether the limit was set (False off glibc)."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, ARENAS))
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the block's imports with the collector off; afterwards freeze what exists and switch it back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()  # the modules' objects: never garbage, and never scanned again
        if enabled:
            gc.enable()
