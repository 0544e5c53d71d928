"""`plait train CONFIG.toml --nproc N` for configs with `[sync] kind = "ps"`: N workers and `sync.servers`
parameter servers on this machine, trained under `sync.consistency` (bsp, ssp:S or asp).

    plait train examples/parameter_server.toml --nproc 4
    plait train examples/parameter_server.toml --nproc 4 --set sync.consistency='"ssp:3"' --set sync.servers=2
    plait train examples/parameter_server.toml --nproc 4 --resume      # servers continue from their checkpoints

Under torchrun the same command runs one process per rank, on one host or several: rank 0 coordinates, ranks
1..S supervise a server each, the others a worker each (plait/ps/torchrun_roles.py; `--nproc` is ignored):

    torchrun --standalone --nproc-per-node 5 -m plait.cli train examples/parameter_server.toml

The run directory, resume, the metric sinks, the progress bar and the plots are the driver's; the plane's launcher
(plait/ps/launcher.py) starts, supervises and evaluates the processes. For servers and workers on different hosts,
see `plait ps --help` and docs/parameter_server.md.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from plait.core.flat import load_flat_params
from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, check_resumed_settings, prepare_run_dir
from plait.ps.config import PSRunConfig
from plait.ps.coordinator import Coordinator
from plait.ps.divergence import WorkerDiverged
from plait.ps.launcher import LocalCluster, server_checkpoints
from plait.ps.summary import ClusterSummary, test_metrics_text
from plait.ps.torchrun_nodes import TorchrunNodes
from plait.ps.torchrun_roles import RUN_KEY, supervise_server, supervise_worker, torchrun_workers
from plait.ps.trainer import build_flat_model, check_config_code
from plait.runtime.checkpoint import save_weights_file
from plait.runtime.torchrun_env import torchrun_store, under_torchrun
from plait.settings.config import ConfigError, read_config


def load_run_config(config_path: Path, overrides: list[str]) -> PSRunConfig:
    return read_config(PSRunConfig, config_path, overrides)


def prepare_ps_run_dir(config: PSRunConfig, resume: bool, servers_here: bool = True) -> RunDir:
    """The run directory, checked for what `--resume` needs (unless the servers' checkpoints may be on other hosts
    than this one: not `servers_here`), with the resolved config written."""
    # the servers' checkpoints are the state a PS run resumes from (the driver's checkpoint.pt is unused)
    if resume and servers_here:
        run_dir = RunDir(Path(config.run.root) / config.run.name)
        if not server_checkpoints(run_dir.path, journals=True):
            raise FileNotFoundError(f"--resume: no server checkpoint or journal in {run_dir.path / 'servers'}")
    elif resume:
        run_dir = RunDir(Path(config.run.root) / config.run.name)
    else:
        run_dir = prepare_run_dir(config.run.root, config.run.name, resume=False)
    if resume:
        check_resumed_settings(run_dir, config)  # before the config it ran with is replaced
    run_dir.write_config(config)  # the processes read the resolved config from here
    return run_dir


def run_ps(config: PSRunConfig, num_workers: int, resume: bool = False, timeout_s: float = 3600.0,
           show_progress: bool = True) -> ClusterSummary:
    """Run a whole parameter-server job on localhost and return its summary."""
    config.check_workers(num_workers)
    check_config_code(config)  # the user's model and data, before anything is written
    run_dir = prepare_ps_run_dir(config, resume)
    with Run(run_dir, resume=resume, step_key="step", total=config.train.steps, description="clocks",
             tensorboard=config.run.tensorboard, show_progress=show_progress) as run:
        summary = LocalCluster(config, run_dir.config_path, run, num_workers, timeout_s).run()
    save_model(config, summary)
    plot_run(run_dir.path, ("loss", "accuracy"))
    return summary


def save_model(config: PSRunConfig, summary: ClusterSummary) -> None:
    """The servers' final weights as the run's model.safetensors, in the model the config names."""
    model, _, spec = build_flat_model(config)
    load_flat_params(model, torch.from_numpy(np.ascontiguousarray(summary.weights)), spec)
    save_weights_file(summary.run_dir, model.state_dict())


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    console = Console()
    if allreduce is not None:
        # stacklevel 1 (the default, made explicit): the warning is about this command's own option.
        warnings.warn(f"--allreduce {allreduce} is ignored: sync.kind = 'ps' synchronises through parameter servers",
                      stacklevel=1)
    config = load_run_config(config_path, overrides)
    try:
        if under_torchrun():
            summary = run_ps_rank(config, config_path, overrides, resume)
            if summary is None:
                return  # a server's or worker's rank: the coordinator (rank 0) reports
        else:
            summary = run_ps(config, nproc, resume)
    except WorkerDiverged as err:  # the run started and failed: exit 1 (a usage or config error is 2)
        Console(stderr=True, soft_wrap=True).print(f"[bold red]diverged:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(1) from None
    final = summary.final
    tested = test_metrics_text(final)  # loss, and accuracy when classifying; nothing without a test set
    workers = len(summary.max_staleness)  # --nproc, or what torchrun's world left for workers
    console.print(f"{config.sync.consistency} with {config.sync.servers} server(s), {workers} worker(s): "
                  f"{f'test {tested}' if tested else 'no test set'} in {summary.elapsed_s:.1f} s")
    console.print(f"max staleness seen per worker: {summary.max_staleness}; server restarts: "
                  f"{summary.server_restarts}; worker restarts: {summary.worker_restarts or 'none'}; failed workers: "
                  f"{summary.failed_workers or 'none'}")
    if summary.time_to_target_s is not None:
        console.print(f"target loss {config.train.target_loss} reached after {summary.time_to_target_s:.2f} s")
    console.print(f"run directory: {summary.run_dir}")
    for path in sorted((Path(summary.run_dir) / "plots").glob("*.png")):  # drawn by the coordinator's rank
        console.print(f"plot: {path}")
    if summary.stopped_by is not None:
        console.print(f"stopped by {summary.stopped_by}: the servers wrote final checkpoints; continue with --resume")
        raise SystemExit(128 + signal.Signals[summary.stopped_by].value)


def run_ps_rank(config: PSRunConfig, config_path: Path, overrides: list[str], resume: bool,
                timeout_s: float = 3600.0) -> ClusterSummary | None:
    """This rank's role under torchrun; rank 0 (the coordinator) returns the run's summary, the others None."""
    store, rank, world_size = torchrun_store(timeout_s=600.0)
    try:
        num_workers = torchrun_workers(config, world_size)
    except (ConfigError, ValueError) as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(2) from None
    if rank == 0:
        check_config_code(config)
        # A group torchrun restarted goes on from the servers' checkpoints and journals, wherever they are.
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resume = resume or (restarted and RunDir(Path(config.run.root) / config.run.name).metrics_path.exists())
        run_dir = prepare_ps_run_dir(config, resume, servers_here=not restarted)
        run_dir.write_pid(0)  # ranks/rank0.pid: the coordinator, which a signal stops cleanly
        store.set(RUN_KEY, "resume" if resume else "fresh")
        with Run(run_dir, resume=resume, step_key="step", total=config.train.steps, description="clocks",
                 tensorboard=config.run.tensorboard, show_progress=False) as run:
            nodes = TorchrunNodes(config, store, run_dir.path, num_workers)
            summary = Coordinator(config, run, nodes, num_workers, timeout_s).run()
        save_model(config, summary)
        plot_run(run_dir.path, ("loss", "accuracy"))
        return summary
    role = supervise_server if rank <= config.sync.servers else supervise_worker
    role(config, config_path, overrides, store, rank, num_workers)
    return None
