"""The `plait` command: demo, run, plot, compare, generate, train, fl.

    plait demo                                  FedAvg on MNIST, 100 non-IID clients, embedded defaults
    plait run CONFIG.toml [--resume] [--set fl.rounds=5]
    plait plot runs/NAME
    plait compare runs/A runs/B [...] [--out DIR]   the settings that differ, final figures, curves overlaid
    plait generate runs/NAME [--prompt TEXT]    text from a trained character or word model
    plait train CONFIG.toml --nproc N           cluster training (data / model / pipeline parallel, parameter server)
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from plait.cli.fl import fl_app
from plait.cli.generate import generate
from plait.cli.ps import ps_app
from plait.cli.startup import cap_malloc_arenas, imports_without_gc
from plait.runtime.divergence import Diverged
from plait.settings.config import ConfigError, apply_overrides, from_dict, load_toml

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distributed and federated training for PyTorch.")
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the terminal

DEMO_CONFIG = Path(__file__).parents[1] / "demo.toml"


def _version(value: bool) -> None:
    if value:
        from plait import __version__

        console.print(f"plait {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Distributed and federated training for PyTorch. Exit codes: 0 done, 1 the run failed, 2 bad usage or
    config (errors go to stderr)."""
    cap_malloc_arenas()  # before any thread allocates (cli/startup.py)


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _run_fl(config_path: Path, resume: bool, overrides: list[str], fresh_name: bool = False) -> None:
    with imports_without_gc():  # torch and the simulator: 0.2-0.4 s less start-up (cli/startup.py)
        from plait.experiment.runs.fl_simulation import run_federated
        from plait.federated.config import FederatedRunConfig

    try:
        config = from_dict(FederatedRunConfig, apply_overrides(load_toml(config_path), overrides))
        summary = run_federated(config, resume=resume, fresh_name=fresh_name)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
    except Diverged as err:  # the run started and failed: exit 1, not the usage error's 2
        _fail(str(err), code=1)
    final = summary.final
    if "test_accuracy" in final:
        console.print(f"final test accuracy: [bold]{final['test_accuracy']:.4f}[/] after {summary.rounds} rounds "
                      f"({summary.train_seconds:.1f} s)")
    console.print(f"run directory: {summary.run_dir}")
    for plot in summary.plots:
        console.print(f"plot: {plot}")


@app.command()
def demo(rounds: int | None = typer.Option(None, help="override fl.rounds")) -> None:
    """FedAvg on real MNIST: 100 clients, pathological non-IID shards, C=0.1."""
    _run_fl(DEMO_CONFIG, resume=False, overrides=[f"fl.rounds={rounds}"] if rounds else [], fresh_name=True)


@app.command()
def run(config: Path = typer.Argument(..., help="a federated run's TOML config"),
        resume: bool = typer.Option(False, "--resume", help="continue from the run directory's last checkpoint"),
        set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set fl.rounds=5")) -> None:
    """Run a federated-learning simulation described by CONFIG."""
    _run_fl(config, resume, set_)


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="a run directory, e.g. runs/demo")) -> None:
    """Draw a run's metrics as titled figures in RUN_DIR/plots (PNG, and SVG beside each)."""
    from plait.experiment.plots import plot_run

    try:
        paths = plot_run(run_dir)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    for path in paths:
        console.print(f"plot: {path}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a federated run directory, e.g. runs/demo")) -> None:
    """Write RUN_DIR/model.safetensors (the final model's state_dict) from the run's last checkpoint."""
    from plait.federated.export import export_run

    try:
        path = export_run(run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"weights: {path}  (load with model.load_state_dict(safetensors.torch.load_file(path)))")


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="two or more run directories, e.g. runs/a runs/b"),
            out: Path | None = typer.Option(None, "--out", help="output folder (default: runs/compare-A-B...)")
            ) -> None:
    """Compare runs: the settings in which they differ, their final figures, their curves on shared plots."""
    from rich.table import Table

    from plait.experiment.compare import HEADLINE, compare_runs, format_cell, is_comparison

    run_dirs = [path for path in run_dirs if not is_comparison(path)]  # `runs/*` also matches earlier outputs
    if out is None and run_dirs:
        out = run_dirs[0].parent / ("compare-" + "-".join(p.name for p in run_dirs))[:120]
    try:
        result = compare_runs(run_dirs, out)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if result.note:
        console.print(result.note)
    console.print("settings that differ: " + (", ".join(result.settings) if result.settings else "none"))
    table = Table()  # the settings and the headline figures; compare.md has every column
    columns = [c for c in dict.fromkeys(k for row in result.rows for k in row)
               if c == "run" or c in result.settings or c in HEADLINE or (c == "plane" and result.note)]
    for column in columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(format_cell(row.get(c)) for c in columns))
    console.print(table)
    for path in result.files:
        console.print(f"written: {path}")




@app.command()
def train(config: Path = typer.Argument(..., help="a cluster-training TOML config"),
          nproc: int = typer.Option(1, "--nproc", help="number of local ranks (workers) to spawn"),
          allreduce: str | None = typer.Option(None, "--allreduce", help="native | ring | tree | naive"),
          resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
          set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Train in a cluster: data, model or pipeline parallel; all-reduce or parameter-server sync."""
    try:
        raw = apply_overrides(load_toml(config), list(set_))  # --set may change the plane too
    except ConfigError as err:
        _fail(str(err))
    tables = {name: raw.get(name, {}) for name in ("parallel", "sync")}
    for name, table in tables.items():
        if not isinstance(table, dict):
            _fail(f"config key '{name}' must be a table, got {table!r}")
    mode = tables["parallel"].get("mode", "data")
    sync = tables["sync"].get("kind", "allreduce")
    # The plane's run entry, imported here so that each command loads only its own plane.
    if mode in ("model", "pipeline"):
        from plait.experiment.runs.pipeline import main as train_main
    elif sync == "ps":
        from plait.experiment.runs.parameter_server import main as train_main
    else:
        from plait.experiment.runs.data_parallel import main as train_main
    try:
        train_main(config, nproc=nproc, resume=resume, overrides=list(set_), allreduce=allreduce)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
    except Diverged as err:  # the run started and failed (train.on_divergence = "stop"): exit 1
        _fail(str(err), code=1)


# `plait generate RUN_DIR`: text from a trained character or word model.
app.command()(generate)
# `plait fl server | client | certs`: federated learning over the network (heavy imports stay inside the commands).
app.add_typer(fl_app, name="fl")
# `plait ps server | worker | keys`: one parameter-server process on any host.
app.add_typer(ps_app, name="ps")
