"""README, "One choice at a time": `plait sweep` over a federated config and a cluster's, as written (fewer rounds
and steps added)."""

from __future__ import annotations

import json

import pytest
from as_a_user import records, run, user_folder
from docs_commands import documented

pytestmark = pytest.mark.slow  # ten runs, each its own process: in make test-slow


@pytest.mark.timeout(600)
def test_a_sweep_of_a_federated_and_of_a_cluster_config(tmp_path):
    folder = user_folder(tmp_path)
    grid = run(documented("plait sweep examples/fedavg_mnist.toml --vary fl.plan.lr=0.05,0.1,0.2 "
                          "--vary data.partition=iid,dirichlet"), folder, ["--set", "fl.rounds=1"], timeout=480)
    names = [f"fedavg_mnist-lr{lr}-partition-{p}" for lr in ("0.05", "0.1", "0.2") for p in ("iid", "dirichlet")]
    for name in names:
        assert [r["round"] for r in records(folder / "runs" / name)] == [1], grid[-3000:]
    summary = json.loads((folder / "runs" / "fedavg_mnist-sweep-lr-partition" / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == names and summary["best"]["name"] in names
    assert "settings that differ: data.partition, fl.plan.lr" in grid and f"best: {summary['best']['name']}" in grid

    cluster = run(documented("plait sweep examples/cluster/own_model.toml --vary train.lr=0.003,0.01 --nproc 2"),
                  folder, ["--set", "train.steps=20"], timeout=300)
    for lr in ("0.003", "0.01"):
        assert records(folder / "runs" / f"own_model-lr{lr}")[-1]["step"] == 20, cluster[-3000:]
    assert "best: own_model-lr" in cluster
