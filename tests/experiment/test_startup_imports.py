"""Start-up imports only what the first round needs: matplotlib comes with the plots at the end of a run, and
TensorBoard's writer after the first record has reached metrics.jsonl (issue 13: start-up of a simulation run)."""

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
LATE = ("matplotlib", "torch.utils.tensorboard")

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
        "at the end": ["matplotlib", "torch.utils.tensorboard"],
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
