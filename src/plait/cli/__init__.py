"""The `plait` command: demo, run, plot, export, compare, generate, train, fl, ps.

    plait demo                                  FedAvg on MNIST, 100 non-IID clients, embedded defaults
    plait run CONFIG.toml [--resume] [--set fl.rounds=5]
    plait plot runs/NAME
    plait compare runs/A runs/B [...] [--out DIR]   the settings that differ, final figures, curves overlaid
    plait generate runs/NAME [--prompt TEXT]    text from a trained character or word model
    plait train CONFIG.toml --nproc N           cluster training (data / model / pipeline parallel, parameter server)
    plait sweep CONFIG.toml --vary fl.plan.lr=0.05,0.1   a run per value (run or train), compared, the best named

The command line is parsed by the standard library's argparse. typer, used before, built a pydantic adapter for each
argument when a command ran: 0.07 s of imports, and with typer's and rich's own 0.15 s of each command's start-up
(benchmarks/RESULTS.md, issue 13). Each command imports its plane only when it runs.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from plait import __version__
from plait.cli import fl, generate, ps, sweep
from plait.cli.output import fail, say, warn_in_one_line
from plait.cli.parsing import Commands, add_command, add_overrides
from plait.cli.startup import cap_malloc_arenas, imports_without_gc
from plait.runtime.divergence import Diverged
from plait.settings.config import ConfigError, apply_overrides, load_toml, read_config

DEMO_CONFIG = Path(__file__).parents[1] / "demo.toml"
EXIT_CODES = ("Exit codes: 0 done, 1 the run failed, 2 bad usage or config (errors go to stderr), 130 interrupted "
              "(Ctrl-C).")


def _run_fl(config_path: Path, resume: bool, overrides: list[str], fresh_name: bool = False) -> None:
    with imports_without_gc():  # torch and the simulator: 0.2-0.4 s less start-up (cli/startup.py)
        from plait.experiment.runs.fl_simulation import run_federated
        from plait.federated.config import FederatedRunConfig

    try:
        config = read_config(FederatedRunConfig, config_path, overrides)
        summary = run_federated(config, resume=resume, fresh_name=fresh_name)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        fail(str(err))
    except Diverged as err:  # the run started and failed: exit 1, not the usage error's 2
        fail(str(err), code=1)
    from plait.experiment.runs.fl_outcome import outcome_lines

    for line in outcome_lines(summary.run_dir, summary.final, summary.rounds, summary.train_seconds):
        say(line)
    if summary.baselines is not None:
        from plait.experiment.runs.fl_baselines import describe

        say(describe(summary.baselines))
    say(f"run directory: {summary.run_dir}")
    for plot in summary.plots:
        say(f"plot: {plot}")


def demo(args: argparse.Namespace) -> None:
    """FedAvg on real MNIST: 100 clients, pathological non-IID shards, C=0.1."""
    _run_fl(DEMO_CONFIG, resume=False, overrides=[f"fl.rounds={args.rounds}"] if args.rounds else [],
            fresh_name=True)


def run(args: argparse.Namespace) -> None:
    """Run a federated-learning simulation described by CONFIG."""
    _run_fl(args.config, args.resume, args.set)


def plot(args: argparse.Namespace) -> None:
    """Draw a run's metrics as titled figures in RUN_DIR/plots (PNG, and SVG beside each)."""
    from plait.experiment.plots import plot_run

    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    for path in paths:
        say(f"plot: {path}")
    if not paths:  # e.g. a run that stopped before its first record
        say(f"[yellow]warning:[/] {args.run_dir} holds no records to plot", stderr=True)


def export(args: argparse.Namespace) -> None:
    """Write RUN_DIR/model.safetensors (the final model's state_dict) from the run's last checkpoint."""
    from plait.federated.export import export_run

    try:
        path = export_run(args.run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    say(f"weights: {path}  (load with model.load_state_dict(safetensors.torch.load_file(path)))")


def compare(args: argparse.Namespace) -> None:
    """Compare runs: the settings in which they differ, their final figures, their curves on shared plots."""
    from plait.cli.output import show_comparison
    from plait.experiment.compare import compare_runs, is_comparison

    run_dirs = [path for path in args.run_dirs if not is_comparison(path)]  # `runs/*` also matches earlier outputs
    out = args.out
    if out is None and run_dirs:
        out = run_dirs[0].parent / ("compare-" + "-".join(p.name for p in run_dirs))[:120]
    try:
        result = compare_runs(run_dirs, out)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    show_comparison(result)


def train(args: argparse.Namespace) -> None:
    """Train in a cluster: data, model or pipeline parallel; all-reduce or parameter-server sync."""
    from plait.experiment.planes import PLANE_KEYS, train_plane

    try:
        # --set may change the plane too; the plane's own run reads the whole config and every override
        chooses_plane = [item for item in args.set if item.split("=", 1)[0].strip().split(".")[0] in PLANE_KEYS]
        plane = train_plane(apply_overrides(load_toml(args.config), chooses_plane))
    except ConfigError as err:
        fail(str(err))
    # The plane's run entry, imported here so that each command loads only its own plane.
    if plane == "pipeline":
        from plait.experiment.runs.pipeline import main as train_main
    elif plane == "parameter_server":
        from plait.experiment.runs.parameter_server import main as train_main
    else:
        from plait.experiment.runs.data_parallel import main as train_main
    try:
        train_main(args.config, nproc=args.nproc, resume=args.resume, overrides=args.set, allreduce=args.allreduce)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        fail(str(err))
    except Diverged as err:  # the run started and failed (train.on_divergence = "stop"): exit 1
        fail(str(err), code=1)


def parser() -> argparse.ArgumentParser:
    """The `plait` command's parser: each sub-command's handler is `args.handler`."""
    top = argparse.ArgumentParser(prog="plait", description="Distributed and federated training for PyTorch. "
                                  + EXIT_CODES)
    top.add_argument("--version", action="version", version=f"plait {__version__}", help="print the version and exit")
    commands: Commands = top.add_subparsers(title="commands", metavar="COMMAND", required=True)

    add_command(commands, "demo", demo).add_argument("--rounds", type=int, default=None, help="override fl.rounds")

    command = add_command(commands, "run", run)
    command.add_argument("config", type=Path, help="a federated run's TOML config")
    command.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    add_overrides(command)

    add_command(commands, "plot", plot).add_argument("run_dir", type=Path, help="a run directory, e.g. runs/demo")
    add_command(commands, "export", export).add_argument("run_dir", type=Path,
                                                         help="a federated run directory, e.g. runs/demo")
    command = add_command(commands, "compare", compare)
    command.add_argument("run_dirs", type=Path, nargs="+", help="two or more run directories, e.g. runs/a runs/b")
    command.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare-A-B...)")

    generate.add_to(commands)
    sweep.add_to(commands)  # `plait sweep CONFIG --vary KEY=V1,V2`: a run per value, compared

    command = add_command(commands, "train", train)
    command.add_argument("config", type=Path, help="a cluster-training TOML config")
    command.add_argument("--nproc", type=int, default=1, help="number of local ranks (workers) to spawn")
    command.add_argument("--allreduce", default=None, help="native | ring | tree | naive (overrides the config)")
    command.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_overrides(command, "train.steps=50")

    fl.add_to(commands)  # `plait fl server | client | certs`: federated learning over the network
    ps.add_to(commands)  # `plait ps server | init | worker | keys`: one parameter-server process on any host
    return top


def app(argv: list[str] | None = None) -> None:
    """The `plait` command (its console script, and `python -m plait.cli`): parse `argv` (default sys.argv[1:])
    and run the sub-command. A failure exits through SystemExit with the code EXIT_CODES gives."""
    args = parser().parse_args(argv)
    cap_malloc_arenas()  # before any thread allocates (cli/startup.py)
    warnings.showwarning = warn_in_one_line
    try:
        args.handler(args)
    except KeyboardInterrupt:  # a stop the user asked for: one line, not a traceback; what was saved stays saved
        again = (" (the same command with --resume goes on from the last checkpoint, when one was written)"
                 if "resume" in args else "")
        fail(f"interrupted{again}", code=130)
