"""Imports only point down the layers (docs/architecture.md): core, user_code (resolving references to a user's
code) and data import no plane and no driver, the
driver layer (experiment/) imports no plane, no plane imports another plane or the command line, and inside a plane
only its run entry points touch the driver's run directory, sinks, progress and plots (moving those entry points
above the planes is the open part of issue 11: the list below may only shrink)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "plait"
PLANES = {"federated", "parallel", "ps"}
DRIVER_MODULES = {"plait.experiment.metrics", "plait.experiment.rundir", "plait.experiment.sinks",
                  "plait.experiment.progress", "plait.experiment.plots", "plait.experiment.compare"}
# A plane's run entry points: they still open the run directory themselves.
RUN_ENTRY_POINTS = {"federated/driver.py", "federated/simulation.py", "federated/net/serve.py",
                    "parallel/train.py", "parallel/pipeline_train.py",
                    "parallel/pipeline/checkpoints.py",  # the pipeline run's resume across torchrun restarts
                    "ps/train.py", "ps/launcher.py", "ps/trainer.py", "ps/server.py"}


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
        if target == layer:
            continue
        if layer in ("core", "user_code") or (layer == "data" and target not in ("core", "user_code")):
            wrong.append(f"{rel} imports {module}: {layer} imports nothing above it")
        elif layer == "experiment" and (target in PLANES or target == "cli"):
            wrong.append(f"{rel} imports {module}: the driver layer imports no plane")
        elif layer in PLANES and (target in PLANES or target == "cli"):
            wrong.append(f"{rel} imports {module}: a plane imports no other plane and not the command line")
        elif layer in PLANES and module in DRIVER_MODULES and rel not in RUN_ENTRY_POINTS:
            wrong.append(f"{rel} imports {module}: only a plane's run entry points may use the driver")
    return wrong


def test_imports_point_down_the_layers():
    edges = _edges()
    assert len(edges) > 100  # the walk found the package
    assert violations(edges) == []


def test_the_check_catches_each_wrong_direction():
    bad = [("core/flat.py", "core", "plait.federated.round_loop"),
           ("user_code.py", "user_code", "plait.experiment.config"),
           ("data/partition.py", "data", "plait.experiment.config"),
           ("experiment/sinks.py", "experiment", "plait.ps.server"),
           ("ps/kvstore.py", "ps", "plait.federated.strategy"),
           ("federated/strategy.py", "federated", "plait.experiment.rundir"),
           ("parallel/collectives.py", "parallel", "plait.cli")]
    assert len(violations(bad)) == len(bad)
    fine = [("federated/driver.py", "federated", "plait.experiment.sinks"),
            ("federated/config.py", "federated", "plait.experiment.sections"),
            ("data/partition.py", "data", "plait.core.flat"),
            ("data/user.py", "data", "plait.user_code")]
    assert violations(fine) == []
