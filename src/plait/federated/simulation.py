"""Run a federated simulation from its config: run directory, metrics per round, checkpoint after every round,
`--resume` from the last checkpoint, plots at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.core.models import build_model
from plait.data.federated import load_federated
from plait.experiment.checkpoint import load_checkpoint, save_checkpoint
from plait.experiment.metrics import MetricsLog, elapsed_so_far, truncate_metrics
from plait.experiment.plots import plot_run
from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.federated.config import FederatedRunConfig
from plait.federated.executor import ClientExecutor, SequentialExecutor
from plait.federated.server import FederatedServer, ServerState


@dataclass(slots=True)
class RunSummary:
    run_dir: Path
    rounds: int
    final: dict[str, Any]
    plots: list[Path]
    train_seconds: float


def build_executor(config: FederatedRunConfig, model: torch.nn.Module) -> ClientExecutor:
    if config.fl.executor == "process_pool":
        from plait.federated.pool_executor import ProcessPoolExecutor

        return ProcessPoolExecutor(model, config.fl.workers, threads_per_worker=max(1, config.run.threads))
    return SequentialExecutor()


def build_server(config: FederatedRunConfig, executor: ClientExecutor | None = None) -> FederatedServer:
    """The server with its data, model and client executor (sequential unless `fl.executor` says otherwise), or,
    with `fl.gossip.topology` set, the server-less gossip runner, which has the same interface."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    data = load_federated(config.data)
    torch.manual_seed(config.run.seed)  # the initial global model
    model = build_model(config.model.name, **({"vocab_size": data.num_classes} if config.model.name == "char_lstm" else {}))
    if config.fl.gossip.enabled:  # decentralised: no server, nodes average with their neighbours
        from plait.federated.gossip import GossipRunner

        return GossipRunner(config.fl, model, data, config.run.seed)
    executor = executor or build_executor(config, model)
    try:
        return FederatedServer(config.fl, model, data, executor, config.run.seed)
    except Exception:
        executor.close()  # a worker pool must not outlive a server that failed to start
        raise


def _resume_state(run: RunDir, server: FederatedServer) -> ServerState:
    ckpt = load_checkpoint(run.checkpoint_path)
    if ckpt["params"].shape != server.initial_params.shape:
        raise ValueError(f"{run.checkpoint_path} holds {ckpt['params'].numel()} parameters, the model has "
                         f"{server.initial_params.numel()}: was the config's model changed?")
    truncate_metrics(run.metrics_path, "round", ckpt["round"])  # rounds after the checkpoint are redone once
    if hasattr(server, "stages"):
        server.stages.load_residuals(ckpt.get("residuals", {}))
    return ServerState(ckpt["round"], ckpt["params"], ckpt["opt_state"])


def run_federated(config: FederatedRunConfig, resume: bool = False, show_progress: bool = True,
                  fresh_name: bool = False) -> RunSummary:
    run = prepare_run_dir(config.run.root, config.run.name, resume, fresh_name)
    server = build_server(config)  # data and model before writing anything: bad paths fail at start
    total = config.fl.rounds
    started = time.perf_counter()
    last: dict[str, Any] = {}
    try:
        state = _resume_state(run, server) if resume else server.initial_state()
        if not resume:
            run.write_config(config)
        if resume:
            started -= elapsed_so_far(run.metrics_path)  # the clock goes on from the rounds the log keeps
        with MetricsLog(run.metrics_path) as log, progress_bar("rounds", total, state.round, show_progress) as bar:
            while state.round < total:
                state, record = server.run_round(state)
                record["elapsed_s"] = time.perf_counter() - started
                log.write(record)
                save_checkpoint(run.checkpoint_path, {
                    "round": state.round, "params": state.params, "opt_state": state.opt_state,
                    # simulated clients' error-feedback residuals: real clients keep their own
                    "residuals": server.stages.residuals() if hasattr(server, "stages") else {}})
                last = record
                acc = record.get("accuracy")
                bar.advance(state.round, f"acc {acc:.4f}" if acc is not None else "")
                if record.get("stop"):  # e.g. the privacy budget is spent: no further round may release anything
                    break
    finally:
        server.executor.close()
    plots = plot_run(run.path)
    return RunSummary(run.path, state.round, last, plots, time.perf_counter() - started)
