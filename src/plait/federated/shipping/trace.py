"""The server's side: the model and its task traced by `torch.export` into three graphs, written as a program file.

    train    (inputs..., targets) -> the task's training loss, the model in train mode (dropout on, BatchNorm on
             batch statistics and updating its running ones)
    eval     (inputs...) -> the model's outputs, in eval mode
    metrics  (outputs, targets) -> the task's evaluation sums (e.g. loss and accuracy)

The batch dimension is traced as dynamic, so one program takes every batch size. The program holds the model's
initial state (each round's weights then arrive as the flat vector, as for a client that imports the model) and
describes the state's order, so a client's flat layout is the server's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from plait.federated.shipping.container import write_program
from plait.federated.shipping.graph import DTYPES, LAYOUTS, MEMORY_FORMATS, NUMERIC
from plait.federated.task import Inputs, Task

SETTING = "net.ship_program"
EXAMPLES = 3  # the traced batch: not 0 or 1 (which torch.export specializes) nor a common layer size


class _Train(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.task.train_loss(self.model, _inputs(args[:-1]), args[-1])


class _Eval(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, *args: torch.Tensor) -> Any:
        return self.task.forward(self.model, _inputs(args))


class _Metrics(torch.nn.Module):
    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def forward(self, *args: torch.Tensor) -> Any:
        outputs, targets = args
        return self.task.eval_sums(outputs, targets)


def _inputs(args: tuple[torch.Tensor, ...]) -> Inputs:
    return args[0] if len(args) == 1 else tuple(args)


def export_program(model: torch.nn.Module, task: Task, x: Inputs, y: torch.Tensor, label: str) -> bytes:
    """The program file of `model` with `task`, traced on a few examples of (x, y); ValueError naming the setting
    when the model or the task does something a shipped graph cannot hold."""
    count = len(y)
    if count == 0:
        raise ValueError(f"{SETTING}: tracing the model needs examples (the server's test set is empty)")
    index = torch.arange(EXAMPLES) % count
    xs = x if isinstance(x, tuple) else (x,)
    sample = tuple(part[index] for part in xs)
    targets = y[index]
    state = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    # tracing runs the model's code on fake tensors; keep the caller's random streams as they were
    with torch.random.fork_rng(devices=[]):
        try:
            model.train()
            train, train_out = _export(_Train(model, task), (*sample, targets), "train")
            model.eval()
            eval_, outputs = _export(_Eval(model, task), sample, "eval")
            metrics, sums = _export(_Metrics(task), (outputs, targets), "metrics")
        finally:
            model.train(was_training)
            with torch.no_grad():  # the eager runs moved BatchNorm's statistics: the initial model stays initial
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                    tensor.copy_(state[name])
    if not isinstance(train_out, torch.Tensor) or train_out.dim() != 0 or not train_out.is_floating_point():
        raise ValueError(f"{SETTING}: the task's train_loss must return a scalar float tensor")
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"{SETTING}: the model must return one tensor to be shipped, got {type(outputs).__name__}")
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in sums.items()):
        raise ValueError(f"{SETTING}: the task's eval_sums must return a dict of named tensors")
    constants: dict[str, torch.Tensor] = {}
    graphs = {name: _encode(program, name, state, constants)
              for name, program in (("train", train), ("eval", eval_), ("metrics", metrics))}
    description = {
        "model": label, "torch": torch.__version__,
        "parameters": [[name, p.requires_grad] for name, p in model.named_parameters()],
        "buffers": [name for name, _ in model.named_buffers()],
        "inputs": [_describe(part) for part in sample], "targets": _describe(targets),
        "metrics": list(sums), "graphs": graphs,
    }
    tensors = {f"state/{name}": t for name, t in state.items()} | {f"const/{k}": t for k, t in constants.items()}
    return write_program(tensors, description)


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape[1:])}


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...],
            name: str) -> tuple[torch.export.ExportedProgram, Any]:
    """The exported program of `module` on `args` (dynamic batch) and its eager output on them."""
    batch = torch.export.Dim("batch")
    try:
        with torch.no_grad():
            eager = module(*args)
        program = torch.export.export(module, args, dynamic_shapes={"args": tuple({0: batch} for _ in args)})
    except Exception as err:
        hint = (" (a batch size read as a Python int, e.g. len(targets), fixes the graph to one batch size: use "
                "targets.shape[0])" if "specialized" in str(err) or "Constraints violated" in str(err) else "")
        raise ValueError(f"{SETTING}: torch.export could not trace the {name} graph{hint}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return program, eager


def _encode(program: torch.export.ExportedProgram, graph_name: str, state: dict[str, torch.Tensor],
            constants: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The graph as JSON data (graph.py's format); its tensor constants are added to `constants`."""
    from torch.export.graph_signature import InputKind, OutputKind

    where = f"{SETTING}: the {graph_name} graph"
    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer", InputKind.CONSTANT_TENSOR: "constant",
             InputKind.USER_INPUT: "input"}
    inputs = []
    for spec in program.graph_signature.input_specs:
        kind = kinds.get(spec.kind)
        if kind is None:
            raise ValueError(f"{where} takes a {spec.kind.name} input, which a shipped graph cannot hold")
        target = spec.target or ""
        if kind in ("parameter", "buffer"):
            target = target.removeprefix("model.")
            if target not in state:
                raise ValueError(f"{where} reads {spec.target!r}, which is not the model's parameter or buffer")
        elif kind == "constant":
            value = program.constants[target]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where} holds a constant {target!r} that is not a tensor")
            target = f"{graph_name}/{target}"
            constants[target] = value
        inputs.append({"name": spec.arg.name, "kind": kind, "target": target} if target else
                      {"name": spec.arg.name, "kind": kind})
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in program.graph_signature.output_specs):
        raise ValueError(f"{where} returns more than its outputs (e.g. a buffer reassigned in forward): shipped "
                         "graphs may update buffers in place only")
    nodes, outputs = [], []
    for node in program.graph.nodes:
        if node.op == "call_function":
            nodes.append({"name": node.name, "op": _op_name(node.target, where),
                          "args": [_arg(a, where) for a in node.args],
                          "kwargs": {k: _arg(v, where) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            outputs = [_arg(a, where) for a in pytree.tree_leaves(node.args[0])]
        elif node.op != "placeholder":
            raise ValueError(f"{where} has a {node.op} node ({node.target}), which a shipped graph cannot hold")
    return {"inputs": inputs, "nodes": nodes, "outputs": outputs}


def _op_name(target: Callable[..., Any], where: str) -> str:
    import operator

    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    for name in (*NUMERIC, "getitem"):
        if target is getattr(operator, name):
            return f"operator.{name}"
    raise ValueError(f"{where} calls {target}; only ATen operators travel (a custom operator or a region such as "
                     "torch.no_grad inside forward cannot be shipped)")


def _arg(value: Any, where: str) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"ref": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_arg(v, where) for v in value]
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout) and str(value).removeprefix("torch.") in LAYOUTS:
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format) and str(value).removeprefix("torch.") in MEMORY_FORMATS:
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ValueError(f"{where} has an argument {value!r} ({type(value).__name__}) that cannot be shipped")

