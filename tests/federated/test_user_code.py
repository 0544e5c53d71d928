"""Bring your own model, data and task: a CNN with BatchNorm and dropout on data Plait does not ship
(examples/custom_model/shapes.py), a regression task, and every way a reference in a config can be wrong."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.client_update import ClientData, client_update
from plait.federated.config import FederatedRunConfig
from plait.federated.evaluate import evaluate
from plait.federated.pool_executor import ProcessPoolExecutor
from plait.federated.simulation import build_server
from plait.federated.task import Task
from plait.federated.weights import flat_model_state
from plait.settings.config import ConfigError, from_dict
from plait.user_code import resolve
from tests_support import EXAMPLE, SHAPES, shapes_config


def test_batchnorm_buffers_are_averaged_with_the_weights(tmp_path):
    # Prepare: one round by the loop, and the same clients' updates by hand
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path)))
    state = server.initial_state()
    assert server.spec.buffers == ("1.running_mean", "1.running_var")  # BatchNorm statistics travel too
    # Execute
    new_state, record = server.run_round(state)
    # Assert: the new global vector is the example-weighted mean of the clients' (weights and statistics)
    from plait.federated.seeds import client_seed, selection_rng
    from plait.federated.selection import requires, select_clients
    chosen = select_clients(server.devices.properties(1), 0.5, 2, 0.0, requires(), selection_rng(1, 1)).selected
    total, weighted = 0, torch.zeros_like(state.params)
    for cid in chosen:
        plan = server.config.plan.for_client(client_seed(1, 1, cid))
        update = client_update(server.model, server.spec, state.params, ClientData(*server.data.client_train(cid)),
                               plan, server.task)
        weighted += update.delta * update.num_examples
        total += update.num_examples
    torch.testing.assert_close(new_state.params, state.params + weighted / total, rtol=1e-5, atol=1e-6)
    buffers = new_state.params[server.spec.num_params:]
    assert not torch.equal(buffers, state.params[server.spec.num_params:])  # the statistics moved
    assert record["participants"] == 3


def test_local_buffers_stay_with_each_client(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, buffers="local", fraction=1.0)))
    state = server.initial_state()
    assert server.spec.buffers == () and state.params.numel() == server.spec.num_params  # only weights travel
    before = {n: b.clone() for n, b in server.model.named_buffers() if b.is_floating_point()}
    state, _ = server.run_round(state)
    own = server.backend.local
    assert sorted(own) == list(range(6))  # every client kept its own statistics ...
    assert not torch.equal(own[0], own[1])  # ... which differ between clients ...
    assert all(torch.equal(b, before[n]) for n, b in server.model.named_buffers() if n in before)  # never left
    # a resumed run gets each client's statistics back from the checkpoint
    extra = server.checkpoint_extra()
    fresh = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, buffers="local", fraction=1.0)))
    fresh.load_checkpoint_extra(extra)
    assert torch.equal(fresh.backend.local[3], own[3])


def test_pool_executor_gives_the_sequential_weights_for_a_user_model(tmp_path):
    config = from_dict(FederatedRunConfig, shapes_config(tmp_path))
    sequential = build_server(config)
    state = sequential.initial_state()
    expected, _ = sequential.run_round(state)
    pooled = build_server(config, executor=ProcessPoolExecutor(sequential.model, num_workers=2))
    try:
        got, _ = pooled.run_round(state)
    finally:
        pooled.close()
    torch.testing.assert_close(got.params, expected.params, rtol=1e-5, atol=1e-6)


def test_evaluation_runs_in_eval_mode_and_repeats_exactly(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path)))
    params = server.initial_state().params
    x, y = server.data.test_x, server.data.test_y
    first = evaluate(server.model, server.spec, params, x, y, task=server.task)
    second = evaluate(server.model, server.spec, params, x, y, task=server.task)
    assert first == second and server.model.training  # dropout off while evaluating, mode restored after


def test_a_run_leaves_portable_weights(tmp_path):
    summary = run_federated(from_dict(FederatedRunConfig, shapes_config(tmp_path)), show_progress=False)
    weights = load_file(str(summary.run_dir / "model.safetensors"))
    model = resolve(f"{SHAPES}:make_net", "t")()
    model.load_state_dict(weights)  # one line, strict: every parameter and buffer is there
    test = resolve(f"{SHAPES}:load", "t")()
    x, y = test["test_x"], test["test_y"]
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    assert accuracy == pytest.approx(summary.final["test_accuracy"], abs=1e-6)
    # `plait export` writes the same file from the checkpoint alone
    (summary.run_dir / "model.safetensors").unlink()
    from plait.federated.export import export_run

    export_run(summary.run_dir)
    again = load_file(str(summary.run_dir / "model.safetensors"))
    # (BatchNorm's integer batch counter is not federated: the checkpoint does not hold it)
    assert all(torch.equal(again[k], weights[k]) for k in weights if weights[k].is_floating_point())


def test_regression_task_end_to_end(tmp_path):
    raw = {"run": {"name": "reg", "root": str(tmp_path / "runs"), "seed": 0, "threads": 1},
           "model": {"factory": f"{EXAMPLE / 'regression.py'}:make_mlp"},
           "data": {"source": f"{EXAMPLE / 'regression.py'}:load", "num_clients": 5, "partition": "iid",
                    "eval_fraction": 0.1},
           "fl": {"rounds": 10, "fraction": 1.0, "min_clients": 2, "task": "regression", "federated_eval_every": 5,
                  "plan": {"batch_size": 20, "lr": 0.1}}}
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    import json
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_loss"] < 0.85 * records[0]["test_loss"]  # the MSE on the test set went down
    assert "test_accuracy" not in records[-1] and "fed_accuracy" not in records[-1] and records[-1]["fed_loss"] > 0


def test_python_objects_instead_of_references(tmp_path):
    # the same API from Python: a factory, data and a task object stand in for the config's references
    class Smoothed(Task):
        def loss(self, outputs, targets):
            return torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)

    make_net, make_images = resolve(f"{SHAPES}:make_net", "t"), resolve(f"{SHAPES}:make_images", "t")
    x, y = make_images(600, seed=5)
    raw = shapes_config(tmp_path, name="py")
    del raw["model"], raw["data"]["source"]
    server = build_server(from_dict(FederatedRunConfig, raw), model=make_net, data=(x, y), task=Smoothed())
    _, record = server.run_round(server.initial_state())
    assert record["participants"] == 3 and isinstance(server.task, Smoothed)


@pytest.mark.parametrize("change, message", [
    ({"model": {"factory": "no_such_module_xyz:make"}}, "model.factory = 'no_such_module_xyz:make': cannot import"),
    ({"model": {"factory": f"{SHAPES}:missing"}}, "has no 'missing'"),
    ({"model": {"factory": f"{SHAPES}:make_net", "options": {"width": 3}}}, "cannot be called with ['width']"),
    ({"model": {"factory": f"{SHAPES}:SHAPES"}}, "names a int, not something to call"),
    ({"model": {"factory": f"{SHAPES}:make_images", "options": {"count": 2, "seed": 0}}}, "not a torch.nn.Module"),
    ({"model": {"factory": "not a reference"}}, "must look like 'package.module:name'"),
    ({"fl": {"task": "no_such_module_xyz:Task"}}, "fl.task = 'no_such_module_xyz:Task': cannot import"),
    ({"fl": {"task": "regresion"}}, "fl.task = 'regresion'"),
    ({"data": {"source": str(Path("/nonexistent/data.npz"))}}, "no such file or folder"),
    ({"data": {"source": f"{SHAPES}:make_net"}}, "data.source"),
    ({"model": {"factory": f"{EXAMPLE / 'regression.py'}:make_mlp"}}, "the model does not take the data's inputs"),
])
def test_every_bad_reference_is_named_and_nothing_is_written(tmp_path, change, message):
    raw = shapes_config(tmp_path)
    for table, values in change.items():
        raw[table] = {**raw[table], **values}
    with pytest.raises((ValueError, ConfigError)) as err:
        run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "runs" / "shapes").exists()  # nothing half-written


def test_labels_beyond_the_models_outputs_are_named(tmp_path):
    data = tmp_path / "nine.npz"
    x, y = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype(np.float32), np.arange(60) % 9
    np.savez(data, x=x, y=y)
    raw = shapes_config(tmp_path)
    raw["data"]["source"] = str(data)
    with pytest.raises(ValueError, match="labels go up to 8 but the model has 4 outputs"):
        build_server(from_dict(FederatedRunConfig, raw))


def test_flat_state_names_the_dtype_problem():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="several dtypes"):
        flat_model_state(model, buffers=True)


@pytest.mark.parametrize("config, metric", [("fl.toml", "test_accuracy"), ("regression.toml", "test_loss")])
def test_the_examples_run_as_written(tmp_path, config, metric):

    from tests_support import run_plait

    result = run_plait("run", str(EXAMPLE / config), "--set", "fl.rounds=2",
                                      "--set", f"run.root={str(tmp_path)!r}")
    assert result.exit_code == 0, result.output
    run_dir = next(tmp_path.iterdir())
    import json
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and metric in last and (run_dir / "model.safetensors").exists()


@pytest.mark.parametrize("table, key, value, message", [
    ("data", "partition", "dirichlett", "data.partition = 'dirichlett' is not allowed"),
    ("fl", "rounds", -1, "fl.rounds"),
])
def test_a_field_set_after_construction_gets_the_configs_checks(tmp_path, table, key, value, message):
    config = from_dict(FederatedRunConfig, shapes_config(tmp_path))
    setattr(getattr(config, table), key, value)  # the assignment style of docs/api.md, with a typo
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_federated(config, show_progress=False)
    assert not (tmp_path / "runs" / "shapes").exists()


def test_one_set_per_client_from_python_is_the_partition_whatever_the_setting(tmp_path):
    make_net, make_images = resolve(f"{SHAPES}:make_net", "t"), resolve(f"{SHAPES}:make_images", "t")
    clients = [make_images(40 + 10 * k, seed=k) for k in range(4)]
    raw = shapes_config(tmp_path, name="natural")
    del raw["model"], raw["data"]["source"]
    raw["data"]["num_clients"] = 4
    config = from_dict(FederatedRunConfig, raw)
    config.data.partition = "natural"  # as docs/api.md names a list of sets: checked again, and accepted
    summary = run_federated(config, show_progress=False, model=make_net, data=clients)
    assert summary.rounds == 2
    with pytest.raises(ValueError, match="'natural' needs a data set with writers or roles, not mnist"):
        build_server(from_dict(FederatedRunConfig, {"data": {"partition": "natural"}}))


@pytest.mark.parametrize("data, message", [({"shards_per_client": 0}, "data.shards_per_client must be >= 1"),
                                           ({"alpha": 0.0}, "data.alpha > 0")])
def test_a_partitions_setting_is_named(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(FederatedRunConfig, {"data": data})


def test_a_module_for_its_factory_or_a_task_class_for_a_task_says_what_to_pass(tmp_path):
    make_net = resolve(f"{SHAPES}:make_net", "t")
    raw = shapes_config(tmp_path)
    del raw["model"]
    with pytest.raises(ValueError, match=r"model= takes a function that returns a fresh module .* not a \w+ already"):
        build_server(from_dict(FederatedRunConfig, raw), model=make_net())
    with pytest.raises(ValueError, match=r"task= takes a task object \(Task\(\)\), not the class Task"):
        build_server(from_dict(FederatedRunConfig, raw), model=make_net, task=Task)


@pytest.mark.parametrize("name, hint", [("fedprox", "fl.plan.prox_mu"), ("fedadam", "fl.server_opt.name = 'adam'"),
                                        ("fedsgd", "fl.plan.batch_size = 0")])
def test_a_strategy_named_after_a_paper_says_where_that_choice_lives(name, hint):
    with pytest.raises(ConfigError, match="fl.strategy.name = .* is not allowed") as err:
        from_dict(FederatedRunConfig, {"fl": {"strategy": {"name": name}}})
    assert hint in str(err.value)
