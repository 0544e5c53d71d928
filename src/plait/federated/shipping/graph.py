"""A shipped graph: torch.export's ATen graph as plain JSON data, checked when it is read, and run node by node.

    {"inputs":  [{"name": "p_0_weight", "kind": "parameter", "target": "0.weight"}, ..., {"name": "x",
                  "kind": "input"}],
     "nodes":   [{"name": "conv2d", "op": "aten.conv2d.default", "args": [...], "kwargs": {...}}, ...],
     "outputs": [{"ref": "cross_entropy_loss"}]}

An argument is a JSON number, bool, null or string, a list of arguments, or a one-key object: {"ref": an earlier
node or input}, {"dtype": "float32"}, {"device": "cpu"}, {"layout": "strided"}, {"memory_format": "..."}.

Why this and not `torch.export.load` or torch's own JSON deserializer: reading those runs code taken from the bytes
(`torch.load` falls back to a full unpickle; the deserializer hands shape expressions to `sympy.sympify`, which
evaluates them; `ExportedProgram.module()` compiles the stored guard strings with `exec` and generates the module's
Python source from stored names; a target is looked up by walking attributes from `torch`, which reaches `torch.os`).
Here nothing received is evaluated, imported, compiled or unpickled: the JSON is parsed by `json.loads` into
lists, dicts and scalars; an operator is taken only from `torch.ops.aten` (an `OpOverload`, checked by type; none
that reads or writes files, none of the few internal ones that skip ATen's argument checks) or from a fixed table
of `operator` functions on numbers and on ops' result tuples; every other value is a literal of a listed kind, or a
reference to a value computed earlier in the same graph. Such a graph can compute anything ATen can on its inputs
and weights (and so spend a client's memory and time, as any model can), but it cannot reach Python, the file
system or the network. What remains trusted is ATen itself: that its operators check their arguments.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("parameter", "buffer", "constant", "input")
MAX_NODES = 200_000
MAX_DEPTH = 4  # lists of lists at most this deep (ATen arguments are flat or one level of nesting)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_DEVICE_NAME = re.compile(r"(cpu|cuda|meta)(:\d{1,3})?\Z")
_ATEN = re.compile(r"aten\.(_?[a-z][a-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)\Z")

# `operator` functions a graph may call: integer arithmetic on sizes (a dynamic batch dimension), and picking one
# result of an operator that returns several. Checked again when called: numbers only, or an index into a result.
NUMERIC: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
    "truediv": operator.truediv, "mod": operator.mod, "neg": operator.neg}
OPERATORS: dict[str, Callable[..., Any]] = {**NUMERIC, "getitem": operator.getitem}

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
# Operators whose arguments name a file: ATen can read (from_file) and write (save) files; a graph may not.
_FILE_ARGUMENTS = {"filename", "path", "file"}
# ATen checks an operator's arguments (indices in range, views inside their storage) except in a few internal
# operators that skip the checks for speed ("unsafe" in the name, sparse tensors built without their invariants
# checked, aliases with given strides); those could read or write outside a tensor's memory, and are not run.
_UNCHECKED = {"_index_put_impl", "_index_put_impl_", "_reshape_alias", "_reshape_alias_copy"}


class GraphError(ValueError):
    """A received graph is not one this module runs; the message says which part."""


@dataclass(frozen=True, slots=True)
class Ref:
    name: str


class _Device:
    """A device literal: it becomes the device the client trains on (the graph was traced on the server's)."""


DEVICE = _Device()


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    kind: str      # one of KINDS
    target: str    # the state tensor's name (parameter, buffer, constant); "" for an input


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    op: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Graph:
    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Any, ...]

    @property
    def user_inputs(self) -> int:
        return sum(1 for i in self.inputs if i.kind == "input")

    def run(self, state: Callable[[Input], torch.Tensor], values: list[Any], device: torch.device) -> list[Any]:
        """The graph's outputs for the user inputs `values`; `state(input)` gives a parameter, buffer or constant as
        it is now (a model pointed at a round's weights is read afresh on every call)."""
        if len(values) != self.user_inputs:
            raise GraphError(f"the graph takes {self.user_inputs} inputs, got {len(values)}")
        env: dict[str, Any] = {}
        given = iter(values)
        for spec in self.inputs:
            env[spec.name] = next(given) if spec.kind == "input" else state(spec)
        for node in self.nodes:
            args = [_value(a, env, device) for a in node.args]
            kwargs = {k: _value(v, env, device) for k, v in node.kwargs.items()}
            env[node.name] = node.fn(*args, **kwargs)
        return [_value(out, env, device) for out in self.outputs]


def _value(arg: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(arg, Ref):
        return env[arg.name]
    if isinstance(arg, list):
        return [_value(a, env, device) for a in arg]
    if arg is DEVICE:
        return device
    return arg


# ---- reading: every part checked ------------------------------------------------------------------------------------
def parse_graph(data: Any, what: str) -> Graph:
    """A graph from its JSON data (as `json.loads` returned it); GraphError naming `what` and the part otherwise."""
    if not isinstance(data, dict) or set(data) != {"inputs", "nodes", "outputs"}:
        raise GraphError(f"{what}: expected an object with inputs, nodes and outputs")
    inputs, nodes, outputs = data["inputs"], data["nodes"], data["outputs"]
    if not all(isinstance(part, list) for part in (inputs, nodes, outputs)):
        raise GraphError(f"{what}: inputs, nodes and outputs must be lists")
    if len(nodes) > MAX_NODES:
        raise GraphError(f"{what}: {len(nodes)} nodes, more than {MAX_NODES}")
    known: set[str] = set()
    parsed_inputs = tuple(_parse_input(item, known, what) for item in inputs)
    parsed_nodes = tuple(_parse_node(item, known, what) for item in nodes)
    parsed_outputs = tuple(_parse_arg(out, known, f"{what}: outputs", 0) for out in outputs)
    return Graph(parsed_inputs, parsed_nodes, parsed_outputs)


def _new_name(name: Any, known: set[str], what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise GraphError(f"{what}: {name!r} is not a valid value name")
    if name in known:
        raise GraphError(f"{what}: the name {name!r} is defined twice")
    known.add(name)
    return name


def _parse_input(item: Any, known: set[str], what: str) -> Input:
    if not isinstance(item, dict) or not {"name", "kind"} <= set(item) <= {"name", "kind", "target"}:
        raise GraphError(f"{what}: an input must have a name, a kind and (for state) a target")
    kind, target = item["kind"], item.get("target", "")
    if kind not in KINDS:
        raise GraphError(f"{what}: input kind {kind!r} is not one of {KINDS}")
    if not isinstance(target, str) or (kind == "input") != (target == ""):
        raise GraphError(f"{what}: input {item['name']!r}: a state input names its target, a data input none")
    return Input(_new_name(item["name"], known, what), kind, target)


def _parse_node(item: Any, known: set[str], what: str) -> Node:
    if not isinstance(item, dict) or set(item) != {"name", "op", "args", "kwargs"}:
        raise GraphError(f"{what}: a node must have exactly a name, an op, args and kwargs")
    op, args, kwargs = item["op"], item["args"], item["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise GraphError(f"{what}: node {item['name']!r}: args must be a list and kwargs an object")
    where = f"{what}: node {item['name']!r}"
    fn = resolve_op(op, where)
    parsed_args = tuple(_parse_arg(a, known, where, 0) for a in args)
    parsed_kwargs = {}
    for key, value in kwargs.items():
        if not _NAME.match(key):
            raise GraphError(f"{where}: keyword {key!r} is not a valid name")
        parsed_kwargs[key] = _parse_arg(value, known, where, 0)
    if op.startswith("operator."):
        fn = _checked_operator(op.removeprefix("operator."), fn, where)
    return Node(_new_name(item["name"], known, what), op, fn, parsed_args, parsed_kwargs)


def resolve_op(op: Any, where: str) -> Callable[..., Any]:
    """An ATen operator overload (`aten.<name>.<overload>`) or a listed `operator` function; nothing else."""
    if isinstance(op, str) and op.startswith("operator.") and op.removeprefix("operator.") in OPERATORS:
        return OPERATORS[op.removeprefix("operator.")]
    match = _ATEN.match(op) if isinstance(op, str) else None
    if match is None:
        raise GraphError(f"{where}: operator {op!r} is not an ATen operator or a listed operator function")
    try:
        overload = getattr(getattr(torch.ops.aten, match[1]), match[2])
    except (AttributeError, RuntimeError) as err:
        raise GraphError(f"{where}: this client's torch {torch.__version__} has no operator {op!r}") from err
    if not isinstance(overload, torch._ops.OpOverload) or overload.namespace != "aten":
        raise GraphError(f"{where}: {op!r} is not an ATen operator overload")
    if match[1] in ("save", "from_file") or any(arg.name in _FILE_ARGUMENTS for arg in overload._schema.arguments):
        raise GraphError(f"{where}: {op!r} reads or writes files and is not run")
    if "unsafe" in match[1] or "sparse" in match[1] or match[1] in _UNCHECKED:
        raise GraphError(f"{where}: {op!r} skips ATen's argument checks and is not run")
    return overload


def _checked_operator(name: str, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
    """`operator` functions on numbers only (sizes), and getitem only to pick one result of an operator."""
    if name == "getitem":
        def pick(container: Any, index: Any) -> Any:
            if not isinstance(container, (tuple, list)) or type(index) is not int:
                raise GraphError(f"{where}: getitem takes an operator's results and an integer index")
            return container[index]
        return pick

    def arithmetic(*args: Any) -> Any:
        if not all(type(a) in (int, float, bool) for a in args):
            raise GraphError(f"{where}: operator.{name} takes numbers only")
        result = fn(*args)
        if type(result) is int and abs(result) >= 1 << 63:  # sizes fit in int64; chained products must not grow
            raise GraphError(f"{where}: operator.{name} gave {result}, out of the int64 range")
        return result
    return arithmetic


def _parse_arg(arg: Any, known: set[str], where: str, depth: int) -> Any:
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        if depth >= MAX_DEPTH:
            raise GraphError(f"{where}: arguments nested deeper than {MAX_DEPTH}")
        return [_parse_arg(a, known, where, depth + 1) for a in arg]
    if isinstance(arg, dict) and len(arg) == 1:
        (tag, value), = arg.items()
        if tag == "ref":
            if value not in known:
                raise GraphError(f"{where}: refers to {value!r}, which is not computed before it")
            return Ref(value)
        tables: dict[str, dict[str, Any]] = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
        table = tables.get(tag)
        if table is not None and value in table:
            return table[value]
        if tag == "device" and isinstance(value, str) and _DEVICE_NAME.match(value):
            return DEVICE
    raise GraphError(f"{where}: argument {str(arg)[:80]!r} is not a value a shipped graph may hold")
