"""`plait run CONFIG.toml` for a federated simulation: the plane builds the round loop (`build_server`), the driver
runs it in a run directory (`fl_rounds.py`: metrics per round, a checkpoint after every round, `--resume`), then
the final weights and the plots; with `fl.baselines`, each client alone and one model on all the data
(`fl_baselines.py`).

    from plait.experiment import run_federated
    summary = run_federated(config, model=make_net, data=(x, y), task=fl.Task())

Under `fl.executor = 'distributed'` every torchrun rank runs the same rounds; rank 0 alone writes the run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.experiment.runs.fl_rounds import drive_rounds
from plait.federated.config import FederatedRunConfig
from plait.federated.export import save_weights
from plait.federated.server import FederatedServer
from plait.federated.simulation import build_server, distributed_rank
from plait.federated.task import Task
from plait.settings.config import checked


@dataclass(slots=True)
class RunSummary:
    run_dir: Path
    rounds: int
    final: dict[str, Any]
    plots: list[Path]
    train_seconds: float
    baselines: dict[str, Any] | None = None  # fl.baselines: fl_baselines.run_baselines's summary


def run_federated(config: FederatedRunConfig, resume: bool = False, show_progress: bool = True,
                  fresh_name: bool = False, *, model: Callable[[], torch.nn.Module] | None = None,
                  data: Any = None, task: Task | None = None) -> RunSummary:
    """Run a federated simulation in its run directory; `model` (a function returning a fresh module), `data` and
    `task` stand in for the config's `model.factory`, `data.source` and `fl.task` (see `build_server`)."""
    config = checked(config)  # a program may have set a field after construction: it gets the config's checks
    writes = config.fl.executor != "distributed" or distributed_rank(config.fl.device) == 0
    if resume and writes:
        prepare_run_dir(config.run.root, config.run.name, resume)  # no checkpoint: fail before loading anything
    server = build_server(config, model=model, data=data, task=task)  # bad code or data fail before any writing
    started = time.perf_counter()
    try:
        if config.fl.baselines and isinstance(server, FederatedServer):
            from plait.federated.baselines import check_baselines

            check_baselines(server)  # a task without accuracy, no test set: before the rounds, not after them
        if writes:
            run_dir = prepare_run_dir(config.run.root, config.run.name, resume, fresh_name)
        else:  # rank 0's run directory, on a file system every rank reads: its checkpoint is where all resume
            run_dir = RunDir(Path(config.run.root) / config.run.name)
        with Run(run_dir, resume=resume, writes=writes, step_key="round", total=config.fl.rounds,
                 description="rounds", tensorboard=config.run.tensorboard, show_progress=show_progress,
                 config=config) as run:
            state, last = drive_rounds(server, run, target_accuracy=config.fl.target_accuracy)
        if writes:
            save_weights(server.model, server.spec, state.params, run_dir.path)
        baselines = None
        # on the run's executor, which closes with the server (gossip's server-less runner: refused by the config)
        if config.fl.baselines and writes and isinstance(server, FederatedServer):
            from plait.experiment.runs.fl_baselines import last_test_accuracy, run_baselines

            baselines = run_baselines(server, state.round, run_dir.path, last_test_accuracy(run_dir.metrics_path),
                                      show_progress)
    finally:
        server.close()
    plots: list[Path] = []
    del server  # its data and model: the plots read the run directory, and drawn on top of both they made the peak
    if writes:
        plots = plot_run(run_dir.path)
    return RunSummary(run_dir.path, state.round, last, plots, time.perf_counter() - started, baselines)
