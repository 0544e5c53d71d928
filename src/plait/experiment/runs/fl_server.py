"""`plait fl server CONFIG.toml [--resume]`: the network server's run. The plane serves the clients (`serve`: the
gRPC service and the status page on an event loop); in its round thread the driver runs the same rounds as the
simulator (`fl_rounds.py`: metrics, a checkpoint per round, resume, `elapsed_s` that goes on across a resume), then
the final weights; the plots follow once the clients are told the run is done."""

from __future__ import annotations

from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.experiment.runs.fl_rounds import OnRecord, drive_rounds
from plait.federated.export import save_weights
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.serve import serve
from plait.federated.round_loop import RoundLoop


def run_server(config: NetworkRunConfig, resume: bool = False) -> RunDir:
    run_dir = prepare_run_dir(config.run.root, config.run.name, resume)
    with Run(run_dir, resume=resume, step_key="round", total=config.fl.rounds, description="rounds",
             tensorboard=config.run.tensorboard, show_progress=False, config=config) as run:

        def drive(rounds: RoundLoop, on_record: OnRecord) -> None:
            state, _ = drive_rounds(rounds, run, on_record=on_record, target_accuracy=config.fl.target_accuracy)
            save_weights(rounds.model, rounds.spec, state.params, run.path)

        serve(config, run, drive)
    plot_run(run_dir.path)  # the run's figures in runs/NAME/plots, as a simulated run draws them
    return run_dir
