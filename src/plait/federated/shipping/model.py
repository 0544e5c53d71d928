"""The client's side: a program file read back (hash first) into a module and a task that the usual client program
trains and evaluates, so `client_update`, the update pipeline and evaluation run unchanged.

`ShippedModel` holds the model's parameters and buffers under the model's own names and in its order (so its flat
layout is the server's) and runs the program's graphs on them: the train graph's loss is differentiated by
autograd through the ATen operators it calls, and BatchNorm's running statistics are updated in place, as in the
model itself. `ShippedTask` is the task the graphs were traced with: its training loss and evaluation sums.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from plait.federated.shipping.container import read_program
from plait.federated.shipping.graph import DTYPES, Graph, GraphError, Input, parse_graph
from plait.federated.task import Inputs, Task, take

_STATE_NAME = re.compile(r"[A-Za-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100}){0,31}\Z")


@dataclass(frozen=True, slots=True)
class TensorDescription:
    dtype: torch.dtype
    shape: tuple[int, ...]   # without the batch dimension


@dataclass(frozen=True, slots=True)
class Program:
    sha256: str
    model: str                                  # the label of the server's model (model.factory or preset)
    parameters: tuple[tuple[str, bool], ...]    # (name, trainable) in the model's order
    buffers: tuple[str, ...]
    inputs: tuple[TensorDescription, ...]
    targets: TensorDescription
    metrics: tuple[str, ...]
    train: Graph
    eval: Graph
    metrics_graph: Graph


def read(data: bytes, sha256: str, max_bytes: int) -> tuple[Program, dict[str, torch.Tensor]]:
    """The program in `data` and its tensors; ValueError starting "the server's program" on anything wrong."""
    try:
        tensors, raw = read_program(data, sha256, max_bytes)
        return _program(raw, sha256, tensors), tensors
    except (GraphError, ValueError) as err:
        raise ValueError(f"the server's program: {err}") from err


def _program(raw: Any, sha256: str, tensors: dict[str, torch.Tensor]) -> Program:
    keys = {"model", "torch", "parameters", "buffers", "inputs", "targets", "metrics", "graphs"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise ValueError(f"its description must have exactly the keys {sorted(keys)}")
    params = raw["parameters"]
    if not isinstance(params, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], bool)
                                               for p in params):
        raise ValueError("parameters must be a list of [name, trainable]")
    names = [p[0] for p in params] + list(raw["buffers"] if isinstance(raw["buffers"], list) else [None])
    if not all(isinstance(n, str) and _STATE_NAME.match(n) for n in names) or len(set(names)) != len(names):
        raise ValueError("the state's names must be distinct dotted names")
    expected = {f"state/{n}" for n in names}
    consts = {k.removeprefix("const/") for k in tensors if k.startswith("const/")}
    if set(tensors) != expected | {f"const/{k}" for k in consts}:
        raise ValueError(f"its tensors do not match its description: missing {sorted(expected - set(tensors))}, "
                         f"unexpected {sorted(set(tensors) - expected - {f'const/{k}' for k in consts})}")
    if not isinstance(raw["metrics"], list) or not all(isinstance(m, str) for m in raw["metrics"]) \
            or not isinstance(raw["inputs"], list) or not raw["inputs"] or not isinstance(raw["graphs"], dict) \
            or set(raw["graphs"]) != {"train", "eval", "metrics"} or not isinstance(raw["model"], str):
        raise ValueError("its description has a malformed model, inputs, metrics or graphs entry")
    graphs = {name: parse_graph(raw["graphs"][name], f"the {name} graph") for name in ("train", "eval", "metrics")}
    program = Program(sha256, raw["model"], tuple((p[0], p[1]) for p in params), tuple(raw["buffers"]),
                      tuple(_tensor_description(i) for i in raw["inputs"]), _tensor_description(raw["targets"]),
                      tuple(raw["metrics"]), graphs["train"], graphs["eval"], graphs["metrics"])
    num_inputs = len(program.inputs)
    for name, graph, takes, gives in (("train", program.train, num_inputs + 1, 1),
                                      ("eval", program.eval, num_inputs, 1),
                                      ("metrics", program.metrics_graph, 2, len(program.metrics))):
        if graph.user_inputs != takes or len(graph.outputs) != gives:
            raise ValueError(f"the {name} graph takes {graph.user_inputs} inputs and gives {len(graph.outputs)} "
                             f"outputs, expected {takes} and {gives}")
        for spec in graph.inputs:
            known = {"parameter": {p[0] for p in params}, "buffer": set(program.buffers), "constant": consts,
                     "input": {""}}[spec.kind]
            if spec.target not in known:
                raise ValueError(f"the {name} graph reads {spec.kind} {spec.target!r}, which the program lacks")
    return program


def _tensor_description(raw: Any) -> TensorDescription:
    if not isinstance(raw, dict) or raw.get("dtype") not in DTYPES or not isinstance(raw.get("shape"), list) \
            or not all(type(n) is int and n >= 0 for n in raw["shape"]):
        raise ValueError(f"a tensor description {str(raw)[:80]} is malformed")
    return TensorDescription(DTYPES[raw["dtype"]], tuple(raw["shape"]))


class ShippedModel(torch.nn.Module):
    """The model a program describes, on `device`: its forward is the eval graph; `train_loss` the train graph."""

    def __init__(self, program: Program, tensors: dict[str, torch.Tensor], device: torch.device):
        super().__init__()
        self.program, self.device = program, device
        self._slots: dict[str, tuple[torch.nn.Module, str]] = {}
        for name, trainable in program.parameters:
            tensor = tensors[f"state/{name}"].to(device)
            if trainable and not tensor.is_floating_point():
                raise ValueError(f"the server's program: parameter {name!r} is trainable but {tensor.dtype}")
            self._place(name).register_parameter(name.rpartition(".")[2],
                                                 torch.nn.Parameter(tensor, requires_grad=trainable))
        for name in program.buffers:
            self._place(name).register_buffer(name.rpartition(".")[2], tensors[f"state/{name}"].to(device))
        self.constants = {k.removeprefix("const/"): t.to(device) for k, t in tensors.items() if k.startswith("const/")}
        order = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        if order != [p[0] for p in program.parameters] + list(program.buffers):
            raise ValueError("the server's program: its state's order is not a module's (parents' tensors first)")

    def _place(self, name: str) -> torch.nn.Module:
        """The module that owns `name` (created on the way), remembered for reading the tensor at run time."""
        path, _, leaf = name.rpartition(".")
        owner: torch.nn.Module = self
        for part in path.split(".") if path else ():
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise ValueError(f"the server's program: the state name {name!r} clashes with an attribute")
                child = torch.nn.Module()
                owner.add_module(part, child)
            owner = child
        if hasattr(owner, leaf):
            raise ValueError(f"the server's program: the state name {name!r} clashes with an attribute")
        self._slots[name] = (owner, leaf)
        return owner

    def _state(self, spec: Input) -> torch.Tensor:
        """A tensor as the module holds it now: `pointed_at` swaps parameters' data and buffers during a round."""
        if spec.kind == "constant":
            return self.constants[spec.target]
        owner, leaf = self._slots[spec.target]
        tensor = owner._parameters[leaf] if spec.kind == "parameter" else owner._buffers[leaf]
        assert tensor is not None
        return tensor

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        outputs: torch.Tensor = self.program.eval.run(self._state, list(inputs), self.device)[0]
        return outputs

    def train_loss(self, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor:
        values = list(inputs) if isinstance(inputs, tuple) else [inputs]
        loss: torch.Tensor = self.program.train.run(self._state, [*values, targets], self.device)[0]
        return loss

    def eval_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = self.program.metrics_graph.run(self._state, [outputs, targets], self.device)
        return dict(zip(self.program.metrics, sums, strict=True))


class ShippedTask(Task):
    """The server's task, as its graphs: the training loss and the evaluation sums of a `ShippedModel`."""

    def __init__(self, model: ShippedModel):
        self.model = model

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a shipped program computes its loss inside the train graph (train_loss)")

    def train_loss(self, model: torch.nn.Module, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, ShippedModel), "a ShippedTask trains the ShippedModel it was made with"
        return model.train_loss(inputs, targets)

    def eval_sums(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.eval_sums(outputs, targets)


def load_program(data: bytes, sha256: str, max_bytes: int,
                 device: torch.device | str = "cpu") -> tuple[ShippedModel, ShippedTask]:
    """The model and task of the program in `data`, whose bytes must hash to `sha256` (refused unread otherwise)."""
    program, tensors = read(data, sha256, max_bytes)
    model = ShippedModel(program, tensors, torch.device(device))
    return model, ShippedTask(model)


def check_program_fits(model: ShippedModel, task: ShippedTask, x: Inputs, y: torch.Tensor) -> None:
    """The client's data must be what the program was traced on (dtypes, shapes past the batch), and two examples
    must go through the eval and metrics graphs: otherwise a ValueError before the client serves any round."""
    program = model.program
    parts = x if isinstance(x, tuple) else (x,)
    given = [TensorDescription(t.dtype, tuple(t.shape[1:])) for t in parts]
    if given != list(program.inputs) or TensorDescription(y.dtype, tuple(y.shape[1:])) != program.targets:
        raise ValueError(f"the server's program takes inputs {_show(program.inputs)} and targets "
                         f"{_show((program.targets,))}; this client's data has {_show(given)} and "
                         f"{_show((TensorDescription(y.dtype, tuple(y.shape[1:])),))}")
    sample = slice(0, 2)
    try:
        with torch.no_grad():
            task.eval_sums(task.forward(model, take(x, sample)), y[sample])
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(f"the server's program does not run on this client's data ({type(err).__name__}: "
                         f"{err})") from err


def _show(descriptions: Any) -> str:
    return ", ".join(f"{str(d.dtype).removeprefix('torch.')}{['batch', *d.shape]}".replace("'", "")
                     for d in descriptions)
