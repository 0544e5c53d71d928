"""examples/cluster/kvstore_own_loop.py: a user's own model, data and loop on Plait's servers through the KVStore
(issue 12). Run as a user runs it, with short settings: two servers, two worker processes, and each worker's loss
on its own data falls."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "cluster" / "kvstore_own_loop.py"


@pytest.mark.slow  # also run as documented, in tests/documented/test_documented_own_code.py
@pytest.mark.timeout(300)
def test_the_kvstore_example_trains_a_users_model_in_a_users_loop():
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--servers", "2", "--workers", "2", "--steps", "100"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses = {int(w): (float(a), float(b))
              for w, a, b in re.findall(r"worker (\d): loss ([\d.]+) -> ([\d.]+)", done.stdout)}
    assert set(losses) == {0, 1}, done.stdout
    assert all(after < 0.7 * before for before, after in losses.values()), losses


def test_local_servers_name_a_bad_setting():
    from plait.ps.local_servers import local_servers

    with pytest.raises(ValueError, match="consistency = 'ssp'"):
        with local_servers(1, 1, consistency="ssp"):
            pass
    with pytest.raises(ValueError, match="count must be >= 1"):
        with local_servers(0, 1):
            pass
