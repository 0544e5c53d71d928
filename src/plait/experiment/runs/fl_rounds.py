"""Drive a federated run's rounds through the driver's `Run`, for the simulator, the gossip runner and the network
server alike: resume from the checkpoint (the log is cut back to it, `elapsed_s` goes on), one record per round to
every metric sink with `elapsed_s` and `time` (Unix time) added, a checkpoint per round, the progress bar, and the
early stop a round asks for (the privacy budget is spent, the target accuracy is reached)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch

from plait.experiment.run import Run
from plait.federated.round_loop import ServerState
from plait.runtime.divergence import Diverged
from plait.runtime.metrics_log import read_metrics

OnRecord = Callable[[ServerState, dict[str, Any]], None]


class Rounds(Protocol):
    """What the driver runs: the round loop, or the server-less gossip runner."""
    initial_params: torch.Tensor

    def initial_state(self) -> ServerState: ...
    def run_round(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]: ...
    def checkpoint_extra(self) -> dict[str, Any]: ...
    def load_checkpoint_extra(self, ckpt: dict[str, Any]) -> None: ...


def starting_state(run: Run, rounds: Rounds) -> ServerState:
    """The state the run's checkpoint holds (its extras loaded into `rounds`) on resume, else the initial one."""
    ckpt = run.load()
    if ckpt is None:
        return rounds.initial_state()
    if ckpt["params"].shape != rounds.initial_params.shape:
        raise ValueError(f"{run.checkpoint_path} holds {ckpt['params'].numel()} parameters, the model has "
                         f"{rounds.initial_params.numel()}: was the config's model changed?")
    rounds.load_checkpoint_extra(ckpt)
    return ServerState(ckpt["round"], ckpt["params"], ckpt["opt_state"])


def _checkpoint(state: ServerState, rounds: Rounds) -> dict[str, Any]:
    return {"round": state.round, "params": state.params, "opt_state": state.opt_state, **rounds.checkpoint_extra()}


def drive_rounds(rounds: Rounds, run: Run, *, on_record: OnRecord | None = None, target_accuracy: float = 0.0
                 ) -> tuple[ServerState, dict[str, Any]]:
    """Run rounds until `run.total` are done (or one says stop); returns the final state and the last record.
    A process whose run does not write (`run.writes` False: a distributed rank other than 0) runs the same rounds
    from the same state. A resumed run that had reached `target_accuracy` (fl.target_accuracy; one the resume has
    not raised past the accuracy it reached) is done: it trains no further round."""
    state = starting_state(run, rounds)
    started = time.perf_counter() - run.start(state.round)
    last: dict[str, Any] = {}
    kept = _record_of(run, state.round) if run.resume and target_accuracy else {}
    if kept.get("target_reached") and kept.get("test_accuracy", 0.0) >= target_accuracy:
        return state, kept
    while state.round < run.total:
        try:
            state, record = rounds.run_round(state)
        except Diverged as err:  # the last good checkpoint stays as it is, for --resume with other settings
            where = (f"the last good checkpoint is {run.checkpoint_path} (round {state.round})" if state.round
                     else "no round finished: nothing to resume")
            run.write({"round": state.round + 1, "diverged": str(err), "time": time.time()})
            raise Diverged(f"{err}; {where}") from err
        record["elapsed_s"] = time.perf_counter() - started
        record["time"] = time.time()
        run.write(record)
        run.save(state.round, partial(_checkpoint, state, rounds))
        last = record
        if on_record is not None:
            on_record(state, record)
        accuracy = record.get("test_accuracy")
        run.progress(state.round, f"acc {accuracy:.4f}" if accuracy is not None else "")
        if record.get("stop"):  # e.g. the privacy budget is spent: no further round may release anything
            break
    if not last and state.round:  # a resumed run with no round left: its last round's record, as the log holds it
        last = _record_of(run, state.round)
    return state, last


def _record_of(run: Run, round_idx: int) -> dict[str, Any]:
    """Round `round_idx`'s record as the run's log holds it ({} when it holds none)."""
    return next((r for r in reversed(read_metrics(run.run_dir.metrics_path)) if r.get("round") == round_idx), {})
