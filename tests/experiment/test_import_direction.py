"""Imports only point down the layers (docs/architecture.md):

    cli                 the command line
    experiment          the driver: run directory, resume, sinks, progress, plots, compare; it drives the planes
    federated, parallel, ps    the planes: none imports another, the driver or the command line
    data                data sets and partitions
    core, user_code, user_model, settings, runtime, web    maths, references to a user's code and the model
                        they name, config files, what a plane is handed by the driver (the run context, checkpoint
                        files, the metrics log format), and what the live dashboards share (the bounded HTTP
                        server, the charts)

No plane imports the driver: each plane's run entry lives in experiment/runs/ and hands the plane its run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "src" / "plait"
PLANES = {"federated", "parallel", "ps"}
BOTTOM = {"core", "user_code", "user_model", "settings", "runtime", "web"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "plait" or name.startswith("plait.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "plait"


def _edges() -> list[tuple[str, str, str]]:
    """(file relative to src/plait, its layer, an imported plait module) for every module of the package."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        layer = rel.split("/")[0].removesuffix(".py")
        edges += [(rel, layer, module) for module in _imports(path)]
    return edges


def violations(edges: list[tuple[str, str, str]]) -> list[str]:
    wrong = []
    for rel, layer, module in edges:
        target = _layer(module)
        if target == layer or target in BOTTOM:
            continue
        if layer in BOTTOM:
            wrong.append(f"{rel} imports {module}: {layer} imports nothing above the bottom layer")
        elif layer == "data":
            wrong.append(f"{rel} imports {module}: data imports only the bottom layer")
        elif layer == "experiment" and target == "cli":
            wrong.append(f"{rel} imports {module}: the driver does not import the command line")
        elif layer in PLANES and (target in PLANES or target == "cli"):
            wrong.append(f"{rel} imports {module}: a plane imports no other plane and not the command line")
        elif layer in PLANES and target == "experiment":
            wrong.append(f"{rel} imports {module}: a plane is handed its run by the driver, it does not import it")
    return wrong


def test_imports_point_down_the_layers():
    edges = _edges()
    assert len(edges) > 100  # the walk found the package
    assert violations(edges) == []


def test_the_check_catches_each_wrong_direction():
    bad = [("core/flat.py", "core", "plait.federated.round_loop"),
           ("user_code.py", "user_code", "plait.data.user"),
           ("user_model.py", "user_model", "plait.federated.task"),
           ("runtime/context.py", "runtime", "plait.experiment.run"),
           ("web/serve.py", "web", "plait.federated.net.status"),
           ("data/partition.py", "data", "plait.federated.config"),
           ("experiment/sinks.py", "experiment", "plait.cli"),
           ("ps/kvstore.py", "ps", "plait.federated.strategy"),
           ("federated/strategy.py", "federated", "plait.experiment.rundir"),
           ("parallel/collectives.py", "parallel", "plait.cli")]
    assert len(violations(bad)) == len(bad)
    fine = [("experiment/run.py", "experiment", "plait.federated.round_loop"),
            ("federated/config.py", "federated", "plait.settings.sections"),
            ("ps/server.py", "ps", "plait.runtime.metrics_log"),
            ("data/partition.py", "data", "plait.core.flat"),
            ("data/user.py", "data", "plait.user_code"),
            ("parallel/components.py", "parallel", "plait.user_model"),
            ("ps/dashboard.py", "ps", "plait.web.serve"),
            ("web/values.py", "web", "plait.settings.config")]
    assert violations(fine) == []
