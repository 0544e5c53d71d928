"""The own-model examples of examples/cluster/ run as their headers say: torchrun, 2 ranks, CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("script", "args"), [
    ("data_parallel_own_loop.py", ["--allreduce", "tree", "--compression", "fp16"]),
    ("pipeline_own_model.py", ["--schedule", "gpipe", "--split", "4"]),
])
@pytest.mark.slow  # also run as documented, in tests/documented/test_documented_own_code.py
def test_example_runs_under_torchrun_with_two_ranks(script, args):
    # --standalone: torchrun picks a free port (tests may run beside other jobs); this checkout's plait first
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"),
                                                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "cluster" / script), *args, "--steps", "100"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 100: loss" in done.stdout and "accuracy" in done.stdout
