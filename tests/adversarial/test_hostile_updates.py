"""Well-formed but hostile input, and failures nobody would otherwise be told about (issue 14):

- a finite but huge update (3e38) is refused by the norm bound, counted once with its reason, and the federation
  goes on (before: the global model became Inf and every client died on the next broadcast);
- a client claiming more examples than it registered is refused (before: 2^62 examples owned the weighted mean);
- a simulated client whose training diverges stops the run with a message naming the round, the client and the
  last good checkpoint, and `plait run` exits 1 (before: NaN loss for 20 rounds, exit 0); or, by a setting, the
  round is skipped and the model stays finite;
- the aggregate of a round does not depend on the order the updates arrive in.
"""

from __future__ import annotations

import itertools
import json
import math

import grpc
import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.bounds import BoundedAggregator, BoundsConfig, Diverged, UpdateRefused, extend_history
from plait.federated.client_update import Update
from plait.federated.config import FederatedRunConfig
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.connection import Connection, Task
from plait.federated.net.local import cluster, read_records, small_config, start_client, write_config
from plait.federated.net.wire import iter_chunks
from plait.federated.strategy import FedAvgAggregator
from plait.federated.task import Task as ClassificationTask
from plait.settings.config import from_dict
from plait.user_code import resolve
from tests_support import EXAMPLE, SHAPES, run_plait, shapes_config

ROGUE = 2


def _updates(conn, session, task, delta, num_examples):
    header = pb.UpdateHeader(client_id=conn.client_id, session=session, round=task.round, task_id=task.task_id,
                             num_examples=num_examples, train_loss=1.0,
                             tensor=pb.TensorHeader(dtype="float32", shape=[delta.numel()],
                                                    num_bytes=delta.numel() * 4))
    return [pb.UpdateChunk(header=header), *(pb.UpdateChunk(data=c) for c in iter_chunks(delta, 1 << 16))]


@pytest.mark.timeout(150)
def test_a_huge_update_and_a_huge_weight_are_refused_and_the_federation_goes_on(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=3, heartbeat_timeout_s=10.0)
    raw["fl"]["fraction"] = 1.0
    path = write_config(tmp_path / "fl.toml", raw)
    run_dir = tmp_path / "runs" / "net"
    with cluster(path, tmp_path, run_dir, num_clients=2) as (server, info, clients):
        rogue = Connection(f"127.0.0.1:{info['port']}", ROGUE, None)
        session = rogue.register({"charging": True, "idle": True, "unmetered": True}, 5).session

        def task_of_round(after):
            for _ in range(60):
                got = rogue.get_task(session, 2.0, 199_210)
                if isinstance(got, Task) and got.round > after:
                    return got
            raise AssertionError("the rogue got no task")

        task = task_of_round(0)
        huge = torch.full((task.params.numel(),), 3e38)
        with pytest.raises(grpc.RpcError) as err:
            rogue.push_chunks(_updates(rogue, session, task, huge, 5), timeout=30)
        # round 1 had no history yet: the absolute bound (fl.bounds.max_norm) refuses it
        assert err.value.details().startswith("norm: ") and "above the bound" in err.value.details()
        task = task_of_round(task.round)
        with pytest.raises(grpc.RpcError) as err:
            rogue.push_chunks(_updates(rogue, session, task, torch.zeros(task.params.numel()), 2**62), timeout=30)
        assert "outside [1, 5]" in err.value.details()
        task = task_of_round(task.round)
        rogue.push_update(session, task, torch.zeros(task.params.numel()), 5, 1.0)  # honest at last: accepted
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [c.wait(timeout=30) for c in clients] == [0, 0]
        rogue.close()
    records = read_records(run_dir)
    assert [(r["participants"], r["refused"]) for r in records] == [(2, 1), (2, 1), (3, 0)]
    assert records[0]["rejected_norm"] == 1 and records[1]["rejected_malformed"] == 1
    assert all(math.isfinite(r["train_loss"]) for r in records)


@pytest.mark.timeout(150)
def test_a_client_of_another_model_or_pipeline_is_refused_at_registration_and_the_server_says_so(tmp_path):
    raw = small_config(tmp_path / "runs", num_clients=3, rounds=1)
    path = write_config(tmp_path / "fl.toml", raw)
    other = write_config(tmp_path / "cnn.toml", {**raw, "model": {"name": "cnn"}})
    with cluster(path, tmp_path, tmp_path / "runs" / "net", num_clients=0) as (server, info, _):
        address = f"127.0.0.1:{info['port']}"
        client = start_client(other, address, 0, tmp_path / "client0.log")
        assert client.wait(timeout=90) != 0
        said = (tmp_path / "client0.log").read_text()
        assert "client 0: the server refused its registration: mismatch: client 0 trains cnn with" in said, said
        assert "the server 2nn with 199210" in said and "Traceback" not in said
        rogue = Connection(address, ROGUE, None)
        with pytest.raises(grpc.RpcError) as err:  # the right model, another update pipeline
            rogue.register({}, 5, "2nn", 199_210, '{"compression": "int8"}')
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("mismatch: client 2's update pipeline")
        rogue.close()
        assert server.poll() is None  # it serves on
        log = (tmp_path / "server.log").read_text()
        assert "client 0 trains cnn with" in log and "client 2's update pipeline" in log  # the server's log says it


def test_the_relative_bound_and_clipping():
    history = extend_history(torch.zeros(0, dtype=torch.float64), [1.0, 2.0, 3.0, 4.0, 5.0])  # median 3
    bounded = BoundedAggregator(FedAvgAggregator(4), BoundsConfig(max_norm=0, norm_factor=10), history)
    bounded.add(0, Update(torch.tensor([20.0, 0, 0, 0]), 1))  # 20 < 30: accepted
    with pytest.raises(UpdateRefused, match="above the bound 30"):
        bounded.add(1, Update(torch.tensor([40.0, 0, 0, 0]), 1))
    with pytest.raises(UpdateRefused) as err:
        bounded.add(2, Update(torch.tensor([math.nan, 0, 0, 0]), 1))
    assert err.value.reason == "nonfinite"
    clipping = BoundedAggregator(FedAvgAggregator(4), BoundsConfig(max_norm=2, clip=True, max_examples=10),
                                 torch.zeros(0, dtype=torch.float64))
    clipping.add(0, Update(torch.tensor([0.0, 8.0, 0, 0]), 5))
    clipping.add(1, Update(torch.tensor([0.0, 0, 0, 1.0]), 1_000_000))  # its weight capped at 10
    torch.testing.assert_close(clipping.result(), torch.tensor([0.0, 2 * 5 / 15, 0, 10 / 15]))


def test_the_aggregate_does_not_depend_on_arrival_order():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50_000, generator=generator) * 10.0 ** k for k in range(-3, 2)]
    weights = [600, 7, 59_999, 1, 300]
    results = []
    for order in itertools.permutations(range(5)):
        aggregator = FedAvgAggregator(50_000)
        for i in order:
            aggregator.add(i, Update(deltas[i], weights[i]))
        results.append(aggregator.result())
    assert all(torch.equal(results[0], r) for r in results[1:])


def _diverging(tmp_path, **bounds):
    raw = shapes_config(tmp_path, name="diverge", bounds=bounds, rounds=4)
    raw["fl"]["plan"] = {"batch_size": 16, "lr": 1e6}
    return raw


def test_a_diverging_simulation_stops_naming_the_round_the_client_and_the_checkpoint(tmp_path):
    with pytest.raises(Diverged) as err:
        run_federated(from_dict(FederatedRunConfig, _diverging(tmp_path)), show_progress=False)
    message = str(err.value)
    assert "round 1: client " in message and "local training diverged" in message
    assert "no round finished" in message
    # the same from the command line: exit 1, the message on stderr
    path = tmp_path / "diverge.toml"
    import tomli_w
    raw = _diverging(tmp_path)
    raw["run"]["name"] = "cli"
    path.write_text(tomli_w.dumps(raw))
    result = run_plait("run", str(path))
    assert result.exit_code == 1 and "local training diverged" in result.output


def test_skip_keeps_the_model_finite_and_says_so(tmp_path):
    summary = run_federated(from_dict(FederatedRunConfig, _diverging(tmp_path, on_divergence="skip")),
                            show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["skipped"] for r in records)
    assert all(r["refused_nonfinite"] >= 1 or r.get("diverged") for r in records)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(summary.run_dir / "model.safetensors")).values())
    assert EXAMPLE.exists()


@pytest.mark.parametrize("on_divergence", ["stop", "skip"])
def test_a_round_whose_every_honest_update_is_too_large_is_said_as_divergence(tmp_path, on_divergence):
    # a bound every update exceeds stands for a model blown up to large finite weights (all later rounds refused)
    raw = shapes_config(tmp_path, name=on_divergence, bounds={"max_norm": 1e-9, "on_divergence": on_divergence})
    said = r"round 1: all 3 clients' updates were refused as above the norm bound .* likely diverged"
    if on_divergence == "stop":
        with pytest.raises(Diverged, match=said):
            run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
        return
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] and r["refused_norm"] == 3 and "likely diverged" in r["diverged"] for r in records)



class _NaNEvaluation(ClassificationTask):
    def eval_sums(self, outputs, targets):
        sums = super().eval_sums(outputs, targets)
        return {**sums, "loss": sums["loss"] * float("nan")}


def test_a_nan_the_tasks_evaluation_makes_is_not_blamed_on_the_learning_rate(tmp_path):
    make_net = resolve(f"{SHAPES}:make_net", "t")
    raw = shapes_config(tmp_path, name="nan_eval")
    del raw["model"]
    with pytest.raises(Diverged, match="its weights are finite, so the task's evaluation"):
        run_federated(from_dict(FederatedRunConfig, raw), show_progress=False, model=make_net, task=_NaNEvaluation())


class _OverflowingForward(ClassificationTask):
    """Trains as usual; its evaluated outputs overflow, as finite weights grown too large make them."""

    def forward(self, model, inputs):
        outputs = super().forward(model, inputs)
        return outputs if model.training else outputs * float("inf")


class _HugeOutputs(ClassificationTask):
    """Its evaluated outputs are finite but huge, and its loss squares them: infinite in float32."""

    def forward(self, model, inputs):
        outputs = super().forward(model, inputs)
        return outputs if model.training else outputs * 1e19 + 1e19

    def eval_sums(self, outputs, targets):
        return {**super().eval_sums(outputs, targets), "loss": outputs.square().sum()}


@pytest.mark.parametrize("task, said", [(_OverflowingForward(), "are not finite"),
                                        (_HugeOutputs(), "reach [0-9.]+e\\+19")])
def test_a_nan_loss_from_outputs_that_overflow_is_blamed_on_the_rates_not_the_task(tmp_path, task, said):
    make_net = resolve(f"{SHAPES}:make_net", "t")
    raw = shapes_config(tmp_path, name="overflow")
    del raw["model"]
    with pytest.raises(Diverged, match=r"its weights are finite \(the largest \|w\| is [0-9.e+]+\) and the model's "
                                       rf"outputs {said}: they overflow .*lower fl.plan.lr, or set it to 'skip'"):
        run_federated(from_dict(FederatedRunConfig, raw), show_progress=False, model=make_net, task=task)
