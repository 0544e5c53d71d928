"""`plait sweep`: one real run per combination of the varied settings (each its own `plait run` or `plait train`
process), the runs compared and the best named; values checked before anything runs; a sweep resumed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from plait.experiment.sweep import Member, best_member, command_of, members, parse_vary
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import ConfigError
from tests_support import EXAMPLE, run_plait

SHAPES_FL = EXAMPLE / "fl.toml"
CLUSTER = EXAMPLE.parent / "cluster" / "own_model.toml"


def test_every_combination_is_a_run_named_for_its_values():
    varied = parse_vary(["fl.plan.lr=0.05, 0.1", "fl.strategy.name=fedavg,trimmed mean"])
    assert varied == [("fl.plan.lr", ["0.05", "0.1"]), ("fl.strategy.name", ["fedavg", "trimmed mean"])]
    assert members("demo", varied) == [
        Member("demo-lr0.05-name-fedavg", ("fl.plan.lr=0.05", "fl.strategy.name=fedavg")),
        Member("demo-lr0.05-name-trimmed_mean", ("fl.plan.lr=0.05", "fl.strategy.name=trimmed mean")),
        Member("demo-lr0.1-name-fedavg", ("fl.plan.lr=0.1", "fl.strategy.name=fedavg")),
        Member("demo-lr0.1-name-trimmed_mean", ("fl.plan.lr=0.1", "fl.strategy.name=trimmed mean"))]
    # two keys ending alike are told apart by the part before
    both = members("d", parse_vary(["fl.plan.lr=0.1,0.2", "fl.server_opt.lr=1"]))
    assert [m.name for m in both] == ["d-plan.lr0.1-server_opt.lr1", "d-plan.lr0.2-server_opt.lr1"]
    assert command_of({"fl": {}}) == "run" and command_of({"train": {}}) == "train"


@pytest.mark.parametrize("vary, said", [
    ([], "needs at least one --vary"),
    (["fl.plan.lr"], "expected KEY=V1,V2"),
    (["fl.plan.lr=0.1,"], "expected KEY=V1,V2"),
    (["fl.plan.lr=0.1,0.1"], "lists a value twice"),
    (["fl.plan.lr=0.1", "fl.plan.lr=0.2"], "is given twice"),
])
def test_a_vary_that_cannot_make_a_sweep_is_refused(vary, said):
    with pytest.raises(ConfigError, match=said):
        parse_vary(vary)
    with pytest.raises(ConfigError, match="give one run"):
        members("d", parse_vary(["fl.plan.lr=0.1"]))


def test_the_best_run_is_the_first_to_its_target_else_the_most_accurate_else_the_lowest_loss(tmp_path):
    def log(name, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    log("a", [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.9, "target_reached": True}])
    log("b", [{"round": 1, "test_accuracy": 0.95, "target_reached": True}])
    log("c", [{"round": 3, "test_accuracy": 0.99}])
    assert best_member(["a", "b", "c"], tmp_path) == ("b", "reached the target first, at 1")
    assert best_member(["a", "c"], tmp_path) == ("a", "reached the target first, at 2")
    log("d", [{"step": 5, "train_loss": 0.3}])
    log("e", [{"step": 5, "train_loss": 0.2}, {"step": 6, "train_loss": float("nan")}])
    assert best_member(["c", "d"], tmp_path) == ("c", "the highest final test accuracy, 0.9900")
    assert best_member(["d", "e"], tmp_path) == ("e", "the lowest final loss, 0.2")
    assert best_member([], tmp_path) is None


def _accuracy(run_dir: Path) -> float:
    return [r["test_accuracy"] for r in read_metrics(run_dir / "metrics.jsonl") if "test_accuracy" in r][-1]


def test_a_sweep_runs_each_value_compares_them_and_names_the_best(tmp_path):
    root = tmp_path / "runs"
    common = ["--set", f"run.root={root}", "--set", "fl.rounds=2", "--set", "fl.federated_eval_every=0"]
    refused = run_plait("sweep", SHAPES_FL, "--vary", "fl.plan.lr=0.1,-1", *common)
    assert refused.exit_code == 2 and "plan.lr must be > 0" in refused.stderr and not root.exists()  # nothing ran

    done = run_plait("sweep", SHAPES_FL, "--vary", "fl.plan.lr=0.02,0.2", *common)
    assert done.exit_code == 0, done.output[-3000:]
    runs = {lr: root / f"shapes-lr{lr}" for lr in ("0.02", "0.2")}
    for lr, run_dir in runs.items():  # each a run directory like any other, with its own value
        assert tomllib.loads((run_dir / "config.toml").read_text())["fl"]["plan"]["lr"] == float(lr)
        assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert "sweep 1/2: fl.plan.lr=0.02" in done.stdout and "settings that differ: fl.plan.lr" in done.stdout
    summary = json.loads((root / "shapes-sweep" / "sweep.json").read_text())
    best = max(runs, key=lambda lr: _accuracy(runs[lr]))
    assert summary["best"]["name"] == f"shapes-lr{best}" and f"best: shapes-lr{best}" in done.stdout
    assert [r["exit_code"] for r in summary["runs"]] == [0, 0]
    assert (root / "shapes-sweep" / "compare.md").exists() and (root / "shapes-sweep" / "test_accuracy.png").exists()

    again = run_plait("sweep", SHAPES_FL, "--vary", "fl.plan.lr=0.02,0.2", *common)
    assert again.exit_code == 2
    assert "already holds runs of this sweep (shapes-lr0.02, shapes-lr0.2): --resume" in again.stderr


@pytest.mark.slow  # a resumed sweep and a cluster sweep: more processes, in make test-slow
def test_a_sweep_resumes_and_sweeps_a_clusters_config_too(tmp_path):
    root = tmp_path / "runs"
    common = ["--set", f"run.root={root}", "--set", "fl.rounds=2", "--set", "fl.federated_eval_every=0"]
    assert run_plait("sweep", SHAPES_FL, "--vary", "fl.plan.lr=0.02,0.2", *common).exit_code == 0
    more = run_plait("sweep", SHAPES_FL, "--vary", "fl.plan.lr=0.02,0.2", *common[:-4], "--set", "fl.rounds=3",
                     *common[-2:], "--resume")
    assert more.exit_code == 0, more.output[-3000:]
    for lr in ("0.02", "0.2"):  # each went on from its checkpoint: every round once
        assert [r["round"] for r in read_metrics(root / f"shapes-lr{lr}" / "metrics.jsonl")] == [1, 2, 3]

    cluster = run_plait("sweep", CLUSTER, "--vary", "train.lr=0.003,0.03", "--nproc", "2",
                        "--set", f"run.root={root}", "--set", "train.steps=20", "--set", "train.checkpoint_every=10")
    assert cluster.exit_code == 0, cluster.output[-3000:]
    for lr in ("0.003", "0.03"):
        run_dir = root / f"own_model-lr{lr}"
        assert tomllib.loads((run_dir / "config.toml").read_text())["train"]["lr"] == float(lr)
        assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 20
    assert "best: own_model-lr" in cluster.stdout
