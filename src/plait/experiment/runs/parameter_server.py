"""`plait train CONFIG.toml --nproc N` for configs with `[sync] kind = "ps"`: N workers and `sync.servers`
parameter servers on this machine, trained under `sync.consistency` (bsp, ssp:S or asp).

    plait train examples/parameter_server.toml --nproc 4
    plait train examples/parameter_server.toml --nproc 4 --set sync.consistency='"ssp:3"' --set sync.servers=2
    plait train examples/parameter_server.toml --nproc 4 --resume      # servers continue from their checkpoints

The run directory, resume, the metric sinks, the progress bar and the plots are the driver's; the plane's launcher
(plait/ps/launcher.py) starts, supervises and evaluates the processes. For servers and workers on different hosts,
see `plait ps --help` and docs/parameter_server.md.
"""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.ps.config import PSRunConfig
from plait.ps.divergence import WorkerDiverged
from plait.ps.launcher import LocalCluster, server_checkpoints
from plait.ps.summary import ClusterSummary, test_metrics_text
from plait.ps.trainer import check_config_code
from plait.settings.config import apply_overrides, from_dict, load_toml


def load_run_config(config_path: Path, overrides: list[str]) -> PSRunConfig:
    return from_dict(PSRunConfig, apply_overrides(load_toml(config_path), overrides))


def run_ps(config: PSRunConfig, num_workers: int, resume: bool = False, timeout_s: float = 3600.0,
           show_progress: bool = True) -> ClusterSummary:
    """Run a whole parameter-server job on localhost and return its summary."""
    config.check_workers(num_workers)
    check_config_code(config)  # the user's model and data, before anything is written
    if resume:  # the servers' checkpoints are the state a PS run resumes from (the driver's checkpoint.pt is unused)
        run_dir = RunDir(Path(config.run.root) / config.run.name)
        if not server_checkpoints(run_dir.path, journals=True):
            raise FileNotFoundError(f"--resume: no server checkpoint or journal in {run_dir.path / 'servers'}")
    else:
        run_dir = prepare_run_dir(config.run.root, config.run.name, resume=False)
    run_dir.write_config(config)  # the processes read the resolved config from here
    with Run(run_dir, resume=resume, step_key="step", total=config.train.steps, description="clocks",
             tensorboard=config.run.tensorboard, show_progress=show_progress) as run:
        summary = LocalCluster(config, run_dir.config_path, run, num_workers, timeout_s).run()
    plot_run(run_dir.path, ("loss", "accuracy"))
    return summary


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    console = Console()
    if allreduce is not None:
        # stacklevel 1 (the default, made explicit): the warning is about this command's own option.
        warnings.warn(f"--allreduce {allreduce} is ignored: sync.kind = 'ps' synchronises through parameter servers",
                      stacklevel=1)
    config = load_run_config(config_path, overrides)
    try:
        summary = run_ps(config, nproc, resume)
    except WorkerDiverged as err:  # the run started and failed: exit 1 (a usage or config error is 2)
        Console(stderr=True, soft_wrap=True).print(f"[bold red]diverged:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(1) from None
    final = summary.final
    tested = test_metrics_text(final)  # loss, and accuracy when classifying; nothing without a test set
    console.print(f"{config.sync.consistency} with {config.sync.servers} server(s), {nproc} worker(s): "
                  f"{f'test {tested}' if tested else 'no test set'} in {summary.elapsed_s:.1f} s")
    console.print(f"max staleness seen per worker: {summary.max_staleness}; server restarts: "
                  f"{summary.server_restarts}; worker restarts: {summary.worker_restarts or 'none'}; failed workers: "
                  f"{summary.failed_workers or 'none'}")
    if summary.time_to_target_s is not None:
        console.print(f"target loss {config.train.target_loss} reached after {summary.time_to_target_s:.2f} s")
    console.print(f"run directory: {summary.run_dir}")
    if summary.stopped_by is not None:
        console.print(f"stopped by {summary.stopped_by}: the servers wrote final checkpoints; continue with --resume")
        raise SystemExit(128 + signal.Signals[summary.stopped_by].value)
