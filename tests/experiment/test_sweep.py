"""`plait sweep`: one real run per combination of the varied settings (each its own `plait run` or `plait train`
process), the runs compared and the best named; values checked before anything runs; a sweep resumed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from plait.experiment.sweep import (
    Member,
    best_member,
    command_of,
    member_argv,
    members,
    next_step,
    parse_vary,
    plan_sweep,
    write_summary,
)
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
    with pytest.raises(ConfigError, match=r"a \[net\] table: a network run's server and clients start apart"):
        command_of({"fl": {}, "net": {}})
    # a value may be a TOML list, a table, or a quoted text with a comma
    assert parse_vary(['data.path="a,b",c', "model.options.sizes=[1, 2],[3]", "x={a = 1, b = 2},{a = 3}"]) == [
        ("data.path", ['"a,b"', "c"]), ("model.options.sizes", ["[1, 2]", "[3]"]), ("x", ["{a = 1, b = 2}", "{a = 3}"])]
    with pytest.raises(ConfigError, match="two runs would share the name d-path-_a_b"):
        members("d", parse_vary(["data.path=/a/b,/a_b"]))


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
    summary = json.loads((root / "shapes-sweep-lr" / "sweep.json").read_text())
    best = max(runs, key=lambda lr: _accuracy(runs[lr]))
    assert summary["best"]["name"] == f"shapes-lr{best}" and f"best: shapes-lr{best}" in done.stdout
    assert [r["exit_code"] for r in summary["runs"]] == [0, 0]
    assert (root / "shapes-sweep-lr" / "compare.md").exists()
    assert (root / "shapes-sweep-lr" / "test_accuracy.png").exists()

    assert json.loads((root / "shapes-sweep-lr" / "sweep.json").read_text())["set"] == common[1::2]
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


def test_every_runs_config_is_checked_as_its_command_would_before_any_starts(tmp_path):
    root = ["--set", f"run.root={tmp_path}"]
    # a key below the config's shorthand (model = "spirals.py:make_net") opens its table, as plait train's does
    plan = plan_sweep(CLUSTER, ["model.options.hidden=16,32"], root[1:], resume=False, nproc=2)
    assert [m.name for m in plan.members] == ["own_model-hidden16", "own_model-hidden32"]
    assert plan.out == tmp_path / "own_model-sweep-hidden"
    with pytest.raises(ValueError, match=r"= 4 ranks, but 3 were started \(--nproc\)"):  # the ranks too
        plan_sweep(EXAMPLE.parent / "pipeline.toml", ["train.lr=0.1,0.2"], root[1:], resume=False, nproc=3)
    assert not any(tmp_path.iterdir())  # nothing ran


def test_a_resumed_sweep_skips_finished_runs_and_runs_stopped_before_a_checkpoint(tmp_path):
    plan = plan_sweep(SHAPES_FL, ["fl.plan.lr=0.1,0.2,0.3,0.4"], [f"run.root={tmp_path}"], resume=False)
    finished, stopped, held, fresh = plan.members
    for member in (finished, stopped, held):
        (tmp_path / member.name).mkdir()
        (tmp_path / member.name / "metrics.jsonl").write_text('{"round": 1}\n')
    (tmp_path / held.name / "checkpoint.pt").write_bytes(b"")
    write_summary(plan, ["fl.plan.lr=0.1,0.2,0.3,0.4"], {finished.name: 0, stopped.name: 1})
    again = plan_sweep(SHAPES_FL, ["fl.plan.lr=0.1,0.2,0.3,0.4"], [f"run.root={tmp_path}"], resume=True)
    assert [next_step(again, m, resume=True) for m in again.members] == ["finished", "stopped early", "resume",
                                                                         "start"]
    assert "--resume" in member_argv(again, SHAPES_FL, held, 1, resume=True)
    # under other --set (more rounds, say), a finished run goes on too
    more = plan_sweep(SHAPES_FL, ["fl.plan.lr=0.1,0.2,0.3,0.4"], [f"run.root={tmp_path}", "fl.rounds=30"],
                      resume=True)
    assert more.done == {} and next_step(more, finished, resume=True) == "stopped early"


CHILD = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep(0.5)  # a clean stop takes a while (a parameter server's final checkpoints)
    Path(sys.argv[1]).write_text("stopped cleanly")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


def test_ctrl_c_stops_the_run_under_way_as_it_would_alone_and_the_sweep_with_its_code(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    stopped, ready = tmp_path / "stopped", tmp_path / "ready"
    driver = ("import sys; from plait.experiment.sweep import run_member; "
              f"print('exit', run_member([sys.executable, {str(child)!r}, {str(stopped)!r}, {str(ready)!r}], None))")
    sweep = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own group, as a terminal's: Ctrl-C signals them all
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGINT)
    out, _ = sweep.communicate(timeout=60)
    assert out.strip() == "exit 130" and stopped.read_text() == "stopped cleanly"
