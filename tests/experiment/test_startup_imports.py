"""Start-up imports only what the first round needs: matplotlib comes with the plots at the end of a run,
TensorBoard's writer after the first record has reached metrics.jsonl, rich with the command's first print (its
output here is a pipe: no live progress bar), and pydantic never (the command line is argparse's) (issue 13:
start-up of a simulation run)."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys

import pytest
import tomli_w

from plait.cli.startup import imports_without_gc
from tests_support import shapes_config

# Runs `plait run CONFIG` in a fresh interpreter and says which of the late imports were loaded at each moment.
WATCH = r"""
import json, sys
LATE = ("matplotlib", "pydantic", "rich", "torch.utils.tensorboard")

def loaded():
    return sorted(name for name in LATE if name in sys.modules)

seen = {}
import plait.cli
seen["after importing plait.cli"] = loaded()
import plait.experiment.runs.fl_simulation as simulation
from plait.runtime.metrics_log import MetricsLog
seen["after importing the simulation"] = loaded()

write_record = MetricsLog.write
def first_record(self, record):
    seen.setdefault("at the first record", loaded())
    write_record(self, record)
MetricsLog.write = first_record

plot_run = simulation.plot_run
def plots(path):
    seen["when the plots are drawn"] = loaded()
    return plot_run(path)
simulation.plot_run = plots

sys.argv = ["plait", "run", sys.argv[1]]
try:
    plait.cli.app()
except SystemExit as done:
    assert not done.code, done.code
seen["at the end"] = loaded()
print(json.dumps(seen))
"""


def test_plots_and_tensorboard_are_imported_only_when_needed(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(shapes_config(tmp_path)))
    done = subprocess.run([sys.executable, "-c", WATCH, str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "after importing plait.cli": [],
        "after importing the simulation": [],
        "at the first record": [],
        "when the plots are drawn": ["torch.utils.tensorboard"],
        "at the end": ["matplotlib", "rich", "torch.utils.tensorboard"],
    }
    assert list((tmp_path / "runs" / "shapes" / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "runs" / "shapes" / "plots").glob("*.png"))


def test_imports_run_without_the_collector_and_what_they_made_is_frozen():
    frozen = gc.get_freeze_count()
    try:
        with imports_without_gc():
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]  # stand-ins for the objects an import makes
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
        with pytest.raises(ImportError), imports_without_gc():
            importlib.import_module("plait.no_such_module")
        assert gc.isenabled()  # back on after a failed import too
        gc.disable()
        with imports_without_gc():
            pass
        assert not gc.isenabled()  # a collector the caller had switched off stays off
    finally:
        gc.enable()
        gc.unfreeze()


# Threads that allocate, then glibc's own per-arena report (malloc_stats prints one "Arena N:" block an arena).
ARENAS = r"""
import ctypes, os, sys, threading
from plait.cli.startup import cap_malloc_arenas
capped = cap_malloc_arenas() if sys.argv[1] == "cap" else None
together = threading.Barrier(4)  # all four alive at once: a thread that has ended hands its arena on
def allocate():
    blocks = [bytearray(200_000) for _ in range(20)]  # malloc'd by this thread, from its arena
    together.wait(timeout=60)
    del blocks
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(capped, flush=True)
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_command_caps_mallocs_arenas_unless_the_environment_says(tmp_path):
    def arenas(mode, **env):
        done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=120,
                              env={**{k: v for k, v in __import__("os").environ.items() if k != "MALLOC_ARENA_MAX"},
                                   **env})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip(), done.stderr.count("Arena ")

    assert arenas("cap") == ("True", 2)  # the main arena and one the four threads share
    assert arenas("none")[1] >= 3  # glibc's default: a thread that allocates gets an arena of its own
    assert arenas("cap", MALLOC_ARENA_MAX="3") == ("False", 3)  # the user's setting stands
