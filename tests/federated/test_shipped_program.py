"""The shipped training program in one process: traced from the example's CNN (BatchNorm, dropout), read back
without the model's code, it trains and evaluates exactly as the model itself; what a program file may hold is
checked before anything runs; the client's device setting resolves."""

from __future__ import annotations

import json

import pytest
import torch

from plait.federated.client_update import ClientData, client_update
from plait.federated.evaluate import evaluate
from plait.federated.net.config import NetworkRunConfig, client_device
from plait.federated.net.pipeline import pipeline_fingerprint
from plait.federated.plan import TrainingPlan
from plait.federated.shipping.container import FORMAT, program_sha256, read_program, write_program
from plait.federated.shipping.graph import GraphError, parse_graph
from plait.federated.shipping.model import check_program_fits, load_program
from plait.federated.shipping.trace import export_program
from plait.federated.task import Regression, Task
from plait.federated.weights import flat_model_state
from plait.settings.config import ConfigError, from_dict, load_toml
from plait.user_code import resolve
from tests_support import EXAMPLE, SHAPES

MiB = 1 << 20


def shapes_model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    make_net = resolve(f"{SHAPES}:make_net", "model.factory")
    make_images = resolve(f"{SHAPES}:make_images", "data")
    x, y = make_images(60, seed=3)
    return make_net(), x, y


def test_a_shipped_cnn_trains_and_evaluates_as_the_model_itself():
    # Prepare: the program of a CNN with BatchNorm and dropout, read back with no reference to its code
    model, x, y = shapes_model_and_data()
    data = export_program(model, Task(), x, y, "shapes")
    shipped, task = load_program(data, program_sha256(data), 16 * MiB)
    check_program_fits(shipped, task, x, y)
    weights, spec = flat_model_state(model, buffers=True)
    shipped_weights, shipped_spec = flat_model_state(shipped, buffers=True)
    assert shipped_spec == spec and torch.equal(shipped_weights, weights)  # the same flat layout and start
    plan = TrainingPlan(epochs=2, batch_size=16, lr=0.05, momentum=0.5, seed=11)  # last batch: 12 examples
    # Execute
    imported = client_update(model, spec, weights, ClientData(x, y), plan, Task())
    from_program = client_update(shipped, shipped_spec, weights, ClientData(x, y), plan, task)
    # Assert: the same steps (dropout masks, BatchNorm statistics, momentum) to the bit; the same evaluation
    assert from_program.metrics == imported.metrics
    torch.testing.assert_close(from_program.delta, imported.delta, rtol=0, atol=0)
    assert dict(shipped.named_buffers())["1.num_batches_tracked"] == dict(model.named_buffers())[
        "1.num_batches_tracked"]
    trained = weights + imported.delta
    assert evaluate(shipped, spec, trained, x, y, task, batch_size=25) == \
        evaluate(model, spec, trained, x, y, Task(), batch_size=25)


def test_a_regression_task_and_a_model_of_two_inputs_travel():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.meta = torch.nn.Linear(4, 1), torch.nn.Linear(2, 1)

        def forward(self, image, meta):
            return self.image(image) + self.meta(meta)

    torch.manual_seed(0)
    model, x, y = TwoInputs(), (torch.randn(30, 4), torch.randn(30, 2)), torch.randn(30)
    data = export_program(model, Regression(), x, y, "two")
    shipped, task = load_program(data, program_sha256(data), MiB)
    weights, spec = flat_model_state(model, buffers=True)
    plan = TrainingPlan(batch_size=8, lr=0.1, seed=2)
    imported = client_update(model, spec, weights, ClientData(x, y), plan, Regression())
    from_program = client_update(shipped, spec, weights, ClientData(x, y), plan, task)
    torch.testing.assert_close(from_program.delta, imported.delta, rtol=0, atol=0)
    assert list(evaluate(shipped, spec, weights, x, y, task)) == ["loss", "num_examples"]  # no accuracy


def test_a_task_that_fixes_the_batch_size_is_refused_at_export_with_the_fix():
    class Sized(Task):
        def eval_sums(self, outputs, targets):
            return {"loss": self.loss(outputs, targets) * len(targets)}

    model, x, y = shapes_model_and_data()
    with pytest.raises(ValueError, match=r"net.ship_program: .*metrics graph.*targets.shape\[0\]"):
        export_program(model, Sized(), x, y, "shapes")


def test_a_tampered_or_oversized_program_is_refused_before_it_is_read():
    model, x, y = shapes_model_and_data()
    data = export_program(model, Task(), x, y, "shapes")
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF  # one weight changed
    with pytest.raises(ValueError, match="the server's program: the program's bytes hash to sha256 .* the server "
                                         "announced .*: refused, none of it was read"):
        load_program(bytes(tampered), program_sha256(data), 16 * MiB)
    with pytest.raises(ValueError, match="more than net.max_program_bytes = 1024"):
        load_program(data, program_sha256(data), 1024)


def test_the_client_refuses_data_the_program_was_not_traced_on():
    model, x, y = shapes_model_and_data()
    data = export_program(model, Task(), x, y, "shapes")
    shipped, task = load_program(data, program_sha256(data), 16 * MiB)
    with pytest.raises(ValueError, match=r"takes inputs float32\[batch, 1, 8, 8\].*this client's data has "
                                         r"float32\[batch, 1, 9, 9\]"):
        check_program_fits(shipped, task, torch.zeros(4, 1, 9, 9), y[:4])


def program_with_graph(train_graph: dict) -> bytes:
    """A well-formed program file whose train graph is `train_graph` (a hostile server's)."""
    graph = {"inputs": [{"name": "w", "kind": "parameter", "target": "w"}, {"name": "x", "kind": "input"},
                        {"name": "y", "kind": "input"}], "nodes": [], "outputs": [{"ref": "x"}]}
    description = {"model": "m", "torch": torch.__version__, "parameters": [["w", True]], "buffers": [],
                   "inputs": [{"dtype": "float32", "shape": [2]}], "targets": {"dtype": "int64", "shape": []},
                   "metrics": [], "graphs": {"train": train_graph, "eval": graph | {"inputs": graph["inputs"][:2]},
                                             "metrics": {"inputs": [{"name": "o", "kind": "input"},
                                                                    {"name": "t", "kind": "input"}],
                                                         "nodes": [], "outputs": []}}}
    return write_program({"state/w": torch.zeros(2)}, description)


@pytest.mark.parametrize(("node", "message"), [
    ({"op": "torch.os.system", "args": ["echo owned"]}, "not an ATen operator"),
    ({"op": "aten.save.default", "args": [{"ref": "x"}, "/tmp/owned"]}, "reads or writes files"),
    ({"op": "aten.from_file.default", "args": ["/etc/passwd"]}, "reads or writes files"),
    ({"op": "aten._unsafe_index_put.default", "args": []}, "skips ATen's argument checks"),
    ({"op": "aten._reshape_alias.default", "args": []}, "skips ATen's argument checks"),
    ({"op": "aten.conv2d.__call__", "args": []}, "not an ATen operator"),
    ({"op": "aten.relu.default", "args": [{"ref": "later"}]}, "not computed before it"),
    ({"op": "aten.relu.default", "args": [{"device": "cpu; import os"}]}, "not a value a shipped graph may hold"),
    ({"op": "aten.relu.default", "args": [{"__reduce__": "os.system"}]}, "not a value a shipped graph may hold"),
])
def test_a_graph_that_reaches_beyond_aten_is_refused(node, message):
    graph = {"inputs": [{"name": "w", "kind": "parameter", "target": "w"}, {"name": "x", "kind": "input"},
                        {"name": "y", "kind": "input"}],
             "nodes": [{"name": "bad", "kwargs": {}, **node}], "outputs": [{"ref": "bad"}]}
    data = program_with_graph(graph)
    with pytest.raises(ValueError, match=message):
        load_program(data, program_sha256(data), MiB)


def test_operator_functions_take_numbers_and_results_only():
    graph = parse_graph({"inputs": [{"name": "x", "kind": "input"}],
                         "nodes": [{"name": "big", "op": "operator.mul", "args": [[0], 1 << 40], "kwargs": {}}],
                         "outputs": [{"ref": "big"}]}, "test")
    with pytest.raises(GraphError, match="operator.mul takes numbers only"):
        graph.run(lambda spec: torch.zeros(()), [torch.zeros(1)], torch.device("cpu"))
    square = [{"name": f"n{i}", "op": "operator.mul", "args": [{"ref": f"n{i - 1}"}] * 2, "kwargs": {}}
              for i in range(1, 8)]
    graph = parse_graph({"inputs": [{"name": "n0", "kind": "input"}], "nodes": square,
                         "outputs": [{"ref": "n7"}]}, "test")
    with pytest.raises(GraphError, match="out of the int64 range"):
        graph.run(lambda spec: torch.zeros(()), [1 << 20], torch.device("cpu"))


def test_a_program_file_of_another_format_is_refused():
    from safetensors.torch import save

    data = save({"w": torch.zeros(1)}, metadata={"format": "pt2", "program": json.dumps({})})
    with pytest.raises(ValueError, match=f"the program's format is 'pt2', this client reads '{FORMAT}'"):
        read_program(data, program_sha256(data), MiB)


def test_the_client_device_resolves_and_cuda_without_a_gpu_is_an_error():
    assert client_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert client_device("auto").type == "cuda"
    else:
        assert client_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="net.client_device = 'cuda' but this process sees no CUDA device"):
            client_device("cuda")
    loopback = {"auth": "none", "tls": "off"}
    with pytest.raises(ConfigError, match="client_device"):
        from_dict(NetworkRunConfig, {"net": {**loopback, "client_device": "gpu"}})
    assert from_dict(NetworkRunConfig, {"net": loopback}).net.client_device == "auto"


def test_the_example_ships_its_model_to_clients_whose_config_names_none():
    server = from_dict(NetworkRunConfig, load_toml(EXAMPLE / "fl_shipped.toml"))
    client = from_dict(NetworkRunConfig, load_toml(EXAMPLE / "client_without_model.toml"))
    assert server.net.ship_program and client.net.ship_program
    assert server.model.factory.endswith("shapes.py:make_net") and not client.model.factory
    assert client.fl == server.fl and pipeline_fingerprint(client.fl) == pipeline_fingerprint(server.fl)
