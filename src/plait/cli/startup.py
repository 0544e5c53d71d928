"""Heavy imports without the cyclic garbage collector.

Importing torch and a plane creates about 200 000 objects that live as long as the process. While they are being
made the collector runs again and again over all of them (0.2-0.4 s of a simulation's start-up, measured with
`gc.callbacks`), and finds almost nothing to free. Python's documented pattern for long-lived start-up state
(`gc.freeze`) avoids that: collect nothing while importing, then move what the imports made to the permanent
generation, which later collections skip. The price: the few cycles the imports dropped are frozen too, never freed
(about 7 000 objects, 0.7 MB, for the simulator).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
