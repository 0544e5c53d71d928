"""The accuracy benchmarks of the federated plane, one or two rounds each: their code paths still run on today's data
and API (dp.py's membership audit failed for a day on MNIST's uint8 rows, and no suite ran it), and a reference run
is read against its baselines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_robust_reads_its_clean_run_against_the_baselines():
    import robust

    clean = robust.run(1, {"name": "fedavg"}, "none", baselines=True)
    against = clean["baselines"]
    assert against["fl_accuracy"] == clean["accuracy"] and against["local_epochs"] == 1  # 1 round · C 0.2 · E 1
    assert against["beats_local_by"] == pytest.approx(clean["accuracy"] - against["local_accuracy_mean"])
    attacked = robust.run(1, {"name": "median"}, "sign_flip")
    assert 0 <= attacked["accuracy"] <= 1 and "baselines" not in attacked


def test_dp_audits_a_model_trained_on_mnist_rows():
    import dp

    audit = dp.audit(1, None)
    assert -1 <= audit["advantage"] <= 1 and audit["num_examples"] == 1000 and audit["accuracy"] > 0.1


def test_compression_and_device_mix_run():
    import compression
    import device_mix

    int8 = compression.run(1, {"codec": "int8"})
    assert int8["bytes_up"] > 0 and 0 <= int8["accuracy"] <= 1
    curve, against = device_mix.run(next(iter(device_mix.MIXES.values())), 2)
    assert len(curve) == 1 and against == {}  # evaluated every other round; baselines only when asked
