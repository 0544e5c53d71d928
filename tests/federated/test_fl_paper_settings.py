"""What reproducing the FedAvg paper needs: a target-accuracy stop, learning-rate decay, full-batch local training
(B = ∞: FedSGD with E = 1), and the two baselines a federated run is read against (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import plait.experiment.runs.fl_baselines as fl_baselines
import plait.federated.baselines as baselines_module
from plait.experiment.runs.fl_baselines import CENTRAL_CHECKPOINT, RESULTS_FILE, SUMMARY_FILE, describe, run_baselines
from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.baselines import (
    against_baselines,
    benchmark_line,
    central_accuracy,
    central_model,
    centralised,
    equivalent_epochs,
    local_accuracies,
    local_only,
)
from plait.federated.client_update import ClientData, client_update
from plait.federated.config import FederatedRunConfig
from plait.federated.evaluate import evaluate
from plait.federated.net.config import NetworkRunConfig
from plait.federated.seeds import LOCAL_BASELINE, derive_seed
from plait.federated.simulation import build_server
from plait.federated.task import Task
from plait.settings.config import ConfigError, from_dict
from tests_support import shapes_config


def test_the_run_stops_at_the_target_accuracy_and_records_the_round(tmp_path):
    raw = shapes_config(tmp_path, rounds=40, target_accuracy=0.9, lr_decay=0.9)
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["target_reached"] and records[-1]["test_accuracy"] >= 0.9 and len(records) < 40
    assert all(r["test_accuracy"] < 0.9 for r in records[:-1])  # it stopped at the first round that reached it
    assert records[0]["lr"] == pytest.approx(0.05) and records[1]["lr"] == pytest.approx(0.05 * 0.9)
    # resumed, it is done: no further round (a sweep resumes its finished runs so)
    again = run_federated(from_dict(FederatedRunConfig, raw), resume=True, show_progress=False)
    assert (summary.run_dir / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]
    assert again.rounds == len(records) and again.final["target_reached"]
    # with the target raised past what it reached, it goes on
    higher = run_federated(from_dict(FederatedRunConfig, {**raw, "fl": {**raw["fl"], "target_accuracy": 0.999,
                                                                          "rounds": len(records) + 1}}),
                           resume=True, show_progress=False)
    assert higher.rounds == len(records) + 1


def test_fedsgd_is_full_batch_one_epoch(tmp_path):
    raw = shapes_config(tmp_path, rounds=1)
    raw["fl"]["plan"] = {"epochs": 1, "batch_size": 0, "lr": 0.1}
    server = build_server(from_dict(FederatedRunConfig, raw))
    _, record = server.run_round(server.initial_state())
    assert record["participants"] == 3 and server.config.plan.num_steps(400) == 1  # one step per client


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="fl.target_accuracy"):
        from_dict(FederatedRunConfig, {"fl": {"target_accuracy": 1.5}})
    with pytest.raises(ConfigError, match="fl.lr_decay"):
        from_dict(FederatedRunConfig, {"fl": {"lr_decay": 0}})


def test_baselines_train_each_client_alone_and_one_model_on_all(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, rounds=10)))
    assert equivalent_epochs(server, 10) == 5  # 10 rounds · C 0.5 · E 1
    assert [equivalent_epochs(server, r) for r in (1, 3, 5, 7)] == [1, 2, 3, 4]  # 0.5, 1.5, 2.5, 3.5: a half up
    alone, together = local_only(server, 10), centralised(server, 10)
    assert 0 <= alone["local_accuracy_p10"] <= alone["local_accuracy_mean"] <= alone["local_accuracy_p90"] <= 1
    assert together["central_accuracy"] > 0.9  # the shapes are easy with all the data


def test_with_capped_steps_and_a_quorum_the_baselines_count_the_runs_own_compute(tmp_path, monkeypatch):
    from plait.federated import baselines

    # 6 clients, C 0.5, a quorum of 4: a round trains 4 of 6; each client 2 steps a round (fl.plan.max_steps)
    raw = shapes_config(tmp_path, rounds=3, min_clients=4)
    raw["fl"]["plan"]["max_steps"] = 2
    server = build_server(from_dict(FederatedRunConfig, raw))
    sizes = [server.data.num_examples(cid) for cid in range(6)]
    assert baselines.round_share(server) == pytest.approx(4 / 6) and min(sizes) > 32  # each has its 2 steps
    assert baselines.capped_steps(server, 3, sizes[0]) == 4  # 3 rounds · 4/6 · 2 steps
    assert baselines.baseline_plan(server, 3, seed=0, num_examples=sizes[0]).max_steps == 4
    assert baselines.central_steps(server, 3) == 6 * 4
    steps = []
    real = baselines.client_update

    def counted(*args, **kwargs):
        update = real(*args, **kwargs)
        steps.append(update.metrics["steps"])
        return update

    monkeypatch.setattr(baselines, "client_update", counted)
    baselines.central_model(server, 3)
    assert sum(steps) == 24  # the clients' steps alone, summed: the same examples in batches of 16
    raw["fl"]["plan"]["max_steps"] = 0
    uncapped = build_server(from_dict(FederatedRunConfig, raw))
    assert baselines.equivalent_epochs(uncapped, 3) == 2  # 3 rounds · 4/6 · E 1: the quorum's share, not C's


def _alone_by_hand(server, rounds: int) -> dict[int, float]:
    """Each client trained alone with client_update itself, in this process: the reference (with fl.buffers =
    "local", from the initial buffers, and scored with those its training left)."""
    epochs = equivalent_epochs(server, rounds)
    local = server.backend.initial_local
    out = {}
    for cid in range(server.data.num_clients):
        plan = replace(server.config.plan, epochs=epochs, max_steps=0,
                       seed=derive_seed(server.seed, LOCAL_BASELINE, cid))
        update = client_update(server.model, server.spec, server.initial_params,
                               ClientData(*server.data.client_train(cid)), plan, server.task, local)
        trained = None if local is None else (update.local_buffers, local[1])
        out[cid] = evaluate(server.model, server.spec, server.initial_params + update.delta, server.data.test_x,
                            server.data.test_y, task=server.task, local=trained)["accuracy"]
    return out


# the shapes net has dropout (the threads executor refuses it) and BatchNorm (fl.buffers = "local" applies)
@pytest.mark.parametrize("executor,buffers", [("sequential", "federated"), ("process_pool", "federated"),
                                              ("process_pool", "local")])
def test_clients_alone_train_on_the_runs_executor_with_the_same_results(tmp_path, executor, buffers):
    raw = shapes_config(tmp_path, rounds=4, executor=executor, workers=2, buffers=buffers)
    server = build_server(from_dict(FederatedRunConfig, raw))
    try:
        expected = _alone_by_hand(server, 4)
        assert len(set(expected.values())) > 1  # the clients differ: a mix-up of clients would show
        got = list(local_accuracies(server, 4, skip={2}))
    finally:
        server.close()
    assert [cid for cid, _ in got] == [0, 1, 3, 4, 5]  # in client order, the skipped one left out
    assert dict(got) == {cid: acc for cid, acc in expected.items() if cid != 2}


def test_fl_baselines_write_how_far_the_run_beats_and_approaches_them_and_resume(tmp_path):
    raw = shapes_config(tmp_path, rounds=3, baselines=True)
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    final = summary.final["test_accuracy"]
    written = json.loads((summary.run_dir / SUMMARY_FILE).read_text())
    assert summary.baselines == written and written["fl_accuracy"] == final and written["local_epochs"] == 2
    assert written["beats_local_by"] == pytest.approx(final - written["local_accuracy_mean"])
    assert written["short_of_central_by"] == pytest.approx(written["central_accuracy"] - final)
    lines = [json.loads(line) for line in (summary.run_dir / RESULTS_FILE).read_text().splitlines()]
    assert [r.get("client") for r in lines] == [None, 0, 1, 2, 3, 4, 5] and lines[0]["baseline"] == "central"
    lines = lines[1:] + lines[:1]  # the clients', then the central one
    assert describe(written).startswith(f"baselines at 2 epochs: FL's {final:.2%} beats each client alone")

    # stopped after three clients (one of them marked), one of another setting, and a last line cut short: the marked
    # one is read, not measured again; the rest are measured anew, with the same results, and appended cleanly
    kept = [{**lines[0], "accuracy": 0.0}, lines[1], {**lines[2], "setting": "another"}]
    text = "".join(json.dumps(r) + "\n" for r in kept) + json.dumps(lines[3])[:20]
    (summary.run_dir / RESULTS_FILE).write_text(text)
    server = build_server(from_dict(FederatedRunConfig, raw))
    try:
        again = run_baselines(server, 3, summary.run_dir, final, show_progress=False)
    finally:
        server.close()
    accuracies = [r["accuracy"] for r in lines[1:6]]
    assert again["local_accuracy_mean"] == pytest.approx(sum(accuracies) / 6)  # client 0's kept 0.0 among them
    assert again["central_accuracy"] == written["central_accuracy"]
    after = [json.loads(line) for line in (summary.run_dir / RESULTS_FILE).read_text().splitlines()]
    assert [(r.get("client"), r["setting"] == lines[0]["setting"]) for r in after] == \
        [(0, True), (1, True), (2, False), (None, True), (2, True), (3, True), (4, True), (5, True)]

    # another setting altogether (a resume with another rate): nothing is reused
    other = from_dict(FederatedRunConfig, {**raw, "fl": {**raw["fl"], "plan": {**raw["fl"]["plan"], "lr": 0.2}}})
    server = build_server(other)
    try:
        fresh = run_baselines(server, 3, summary.run_dir, final, show_progress=False)
    finally:
        server.close()
    assert fresh["local_accuracy_mean"] != again["local_accuracy_mean"]


@pytest.mark.parametrize("buffers", ["federated", "local"])  # the shapes net has BatchNorm
def test_the_central_model_started_again_at_an_epoch_gives_the_same_bits(tmp_path, buffers):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, rounds=6, buffers=buffers)))
    assert equivalent_epochs(server, 6) == 3
    seen: dict[int, tuple] = {}
    whole = central_model(server, 6, after_epoch=lambda done, params, own, loss: seen.setdefault(done, (params, own)))
    assert sorted(seen) == [1, 2, 3] and (whole[1] is None) == (buffers == "federated")
    again = central_model(server, 6, *seen[1], done=1)  # from the first epoch's weights, as after a stop
    assert torch.equal(again[0], whole[0]) and not torch.equal(seen[1][0], whole[0])
    if buffers == "local":
        assert torch.equal(again[1], whole[1]) and not torch.equal(seen[1][1], whole[1])


def test_a_central_model_that_diverges_stops_and_says_at_which_epoch(tmp_path):
    raw = shapes_config(tmp_path, rounds=8)
    raw["fl"]["plan"] = {"batch_size": 16, "lr": 1e30}  # the first steps overflow: the weights become NaN
    server = build_server(from_dict(FederatedRunConfig, raw))
    losses: list[float] = []
    central_model(server, 8, after_epoch=lambda done, params, own, loss: losses.append(loss))
    assert len(losses) == 1 and losses[0] != losses[0]  # one epoch, NaN: no further epoch ran
    together = centralised(server, 8)
    assert together["central_diverged_at_epoch"] == 1 and together["central_epochs"] == 4
    summary = run_baselines(server, 8, tmp_path, 0.9, show_progress=False)
    assert summary["central_diverged_at_epoch"] == 1
    assert "(its training diverged at epoch 1)" in describe(summary)
    central = json.loads((tmp_path / RESULTS_FILE).read_text().splitlines()[0])
    assert central["diverged_at_epoch"] == 1 and central["train_loss"] is None  # NaN, as the log writes it


def test_the_central_model_takes_its_own_rate_and_the_clients_results_are_kept(tmp_path):
    raw = shapes_config(tmp_path, rounds=4)
    server = build_server(from_dict(FederatedRunConfig, raw))
    first = run_baselines(server, 4, tmp_path, 0.9, show_progress=False)
    assert "central_lr" not in first
    # the central model at fl.central_lr = 0.2 is the one a run at plan.lr = 0.2 trains, bit for bit
    faster = {**raw, "fl": {**raw["fl"], "plan": {**raw["fl"]["plan"], "lr": 0.2}}}
    expected = central_model(build_server(from_dict(FederatedRunConfig, faster)), 4)[0]
    own = build_server(from_dict(FederatedRunConfig, {**raw, "fl": {**raw["fl"], "central_lr": 0.2}}))
    assert torch.equal(central_model(own, 4)[0], expected)
    again = run_baselines(own, 4, tmp_path, 0.9, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    # the clients alone were read, not measured again; the central model was measured anew beside the first one
    assert [r["baseline"] for r in lines] == ["central"] + ["local"] * 6 + ["central"]
    assert again["local_accuracy_mean"] == first["local_accuracy_mean"] and again["central_lr"] == 0.2
    assert again["central_accuracy"] == pytest.approx(central_accuracy(own, expected, None))
    assert "one model on all the data" in describe(again) and "(at lr 0.2)" in describe(again)
    with pytest.raises(ConfigError, match="fl.central_lr must be >= 0"):
        from_dict(FederatedRunConfig, {**raw, "fl": {**raw["fl"], "central_lr": -1}})


class Stop(Exception):
    pass


def test_a_stop_during_the_central_model_loses_at_most_its_last_epoch(tmp_path, monkeypatch, capsys):
    raw = shapes_config(tmp_path, rounds=8, baselines=True)
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    expected = json.loads((summary.run_dir / SUMMARY_FILE).read_text())
    assert expected["central_epochs"] == 4
    (summary.run_dir / RESULTS_FILE).unlink()
    calls = []
    real = baselines_module.client_update

    def stopping(*args, **kwargs):  # the central model's third epoch is stopped
        calls.append(len(args[3]))
        if len(calls) == 3:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(baselines_module, "client_update", stopping)
    monkeypatch.setattr(fl_baselines, "CENTRAL_SAVE_EVERY_S", 0.0)  # save after every epoch
    monkeypatch.setattr("plait.experiment.progress.PLAIN_EVERY_S", 0.0)  # and say so in the log at each
    server = build_server(from_dict(FederatedRunConfig, raw))
    try:
        with pytest.raises(Stop):
            run_baselines(server, 8, summary.run_dir, None, show_progress=True)
        assert "baselines: one model on all the data (4 epochs) 2/4" in capsys.readouterr().out
        calls.clear()
        resumed = run_baselines(server, 8, summary.run_dir, expected["fl_accuracy"], show_progress=True)
    finally:
        server.close()
    union = sum(server.data.num_examples(cid) for cid in range(server.data.num_clients))
    assert calls == [union] * 2  # epochs 3 and 4 only, on all the data
    assert resumed["central_accuracy"] == expected["central_accuracy"]  # the same bits as the run that never stopped
    assert resumed == expected and not (summary.run_dir / CENTRAL_CHECKPOINT).exists()
    out = capsys.readouterr().out
    assert "one model on all the data (4 epochs) 4/4" in out and "each client alone (4 epochs) 6/6" in out


class NoAccuracy(Task):
    """A task that reports its loss alone."""

    def eval_sums(self, outputs, targets):
        return {"loss": self.loss(outputs, targets).double() * targets.shape[0]}


def test_baselines_are_refused_before_the_rounds_when_the_task_reports_no_accuracy(tmp_path):
    raw = shapes_config(tmp_path, rounds=3, baselines=True)
    with pytest.raises(ValueError, match="fl.baselines compares test accuracy, and the task \\(NoAccuracy\\)"):
        run_federated(from_dict(FederatedRunConfig, raw), show_progress=False, task=NoAccuracy())
    assert not (tmp_path / "runs" / "shapes" / "metrics.jsonl").exists()  # no round ran


def test_the_line_says_when_fl_falls_short_of_the_clients_alone():
    summary = {"local_epochs": 2, "local_accuracy_mean": 0.8, "local_accuracy_p10": 0.7, "local_accuracy_p90": 0.9,
               "central_accuracy": 0.95, "fl_accuracy": 0.75, "beats_local_by": -0.05, "short_of_central_by": 0.2}
    assert describe(summary) == ("baselines at 2 epochs: FL's 75.00% falls short of each client alone 80.00% "
                                 "(p10-p90 70.00%-90.00%) by 5.0 points; one model on all the data 95.00%, 20.0 "
                                 "points above FL's")


def test_a_benchmark_reads_its_run_against_the_baselines(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, rounds=4)))
    summary = against_baselines(server, 4, fl_accuracy=0.9)
    alone, together = local_only(server, 4), centralised(server, 4)
    assert summary == {**alone, **together, "fl_accuracy": 0.9, "beats_local_by": 0.9 - alone["local_accuracy_mean"],
                       "short_of_central_by": together["central_accuracy"] - 0.9}
    line = benchmark_line("robust", summary)
    assert line["plait"] == 0.9 and line["reference"] == round(alone["local_accuracy_mean"], 4)
    assert line["beats_local_by"] == round(0.9 - alone["local_accuracy_mean"], 4) and "goal" in line
    assert json.loads(json.dumps(line)) == line  # one JSON line


def test_baselines_need_the_simulators_clients(tmp_path):
    with pytest.raises(ConfigError, match="fl.baselines"):
        from_dict(FederatedRunConfig, {"fl": {"baselines": True, "gossip": {"topology": "ring"}}})
    with pytest.raises(ConfigError, match="fl.baselines"):
        from_dict(NetworkRunConfig, {"fl": {"baselines": True}, "net": {"auth": "none", "tls": "off"}})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_paper_row_reaches_its_target_within_a_bound(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fedavg_paper.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    assert headline["plait"] is not None and headline["plait"] <= 2 * headline["reference"]  # 97% within 174 rounds
