"""Drive a federated run's rounds in its run directory, for the simulator and the network server alike: resume from
the checkpoint (metrics after it are redone once, `elapsed_s` goes on), one record to every metric sink (JSONL, CSV,
TensorBoard) and one atomic checkpoint per round, a progress bar, and an early stop when a round says so (the
privacy budget is spent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir
from plait.experiment.sinks import MetricSinks
from plait.federated.bounds import Diverged
from plait.federated.round_loop import ServerState
from plait.runtime.checkpoint import load_checkpoint, save_checkpoint
from plait.runtime.metrics_log import elapsed_so_far, truncate_metrics


class Rounds(Protocol):
    """What the driver runs: the round loop, or the server-less gossip runner."""
    initial_params: torch.Tensor

    def initial_state(self) -> ServerState: ...
    def run_round(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]: ...
    def checkpoint_extra(self) -> dict[str, Any]: ...
    def load_checkpoint_extra(self, ckpt: dict[str, Any]) -> None: ...


def checkpointed_state(run: RunDir, rounds: Rounds) -> ServerState:
    """The state a run's checkpoint holds, its extras loaded into `rounds`; nothing in the run is changed."""
    ckpt = load_checkpoint(run.checkpoint_path)
    if ckpt["params"].shape != rounds.initial_params.shape:
        raise ValueError(f"{run.checkpoint_path} holds {ckpt['params'].numel()} parameters, the model has "
                         f"{rounds.initial_params.numel()}: was the config's model changed?")
    rounds.load_checkpoint_extra(ckpt)
    return ServerState(ckpt["round"], ckpt["params"], ckpt["opt_state"])


def resume_state(run: RunDir, rounds: Rounds) -> ServerState:
    state = checkpointed_state(run, rounds)
    truncate_metrics(run.metrics_path, "round", state.round)  # rounds after the checkpoint are redone once
    return state


def drive_rounds(rounds: Rounds, run: RunDir, total: int, *, resume: bool, show_progress: bool = True,
                 tensorboard: bool = True, on_record: Callable[[ServerState, dict[str, Any]], None] | None = None
                 ) -> tuple[ServerState, dict[str, Any]]:
    """Run rounds until `total` are done (or one says stop); returns the final state and the last record."""
    state = resume_state(run, rounds) if resume else rounds.initial_state()
    started = time.perf_counter() - (elapsed_so_far(run.metrics_path) if resume else 0.0)
    last: dict[str, Any] = {}
    sinks = MetricSinks(run.path, "round", resume_after=state.round if resume else None, tensorboard=tensorboard)
    with sinks as log, progress_bar("rounds", total, state.round, show_progress) as bar:
        while state.round < total:
            try:
                state, record = rounds.run_round(state)
            except Diverged as err:  # the last good checkpoint stays as it is, for --resume with other settings
                where = (f"the last good checkpoint is {run.checkpoint_path} (round {state.round})" if state.round
                         else "no round finished: nothing to resume")
                log.write({"round": state.round + 1, "diverged": str(err)})
                raise Diverged(f"{err}; {where}") from err
            record["elapsed_s"] = time.perf_counter() - started
            log.write(record)
            save_checkpoint(run.checkpoint_path, {"round": state.round, "params": state.params,
                                                  "opt_state": state.opt_state, **rounds.checkpoint_extra()})
            last = record
            if on_record is not None:
                on_record(state, record)
            acc = record.get("accuracy")
            bar.advance(state.round, f"acc {acc:.4f}" if acc is not None else "")
            if record.get("stop"):  # e.g. the privacy budget is spent: no further round may release anything
                break
    return state, last
