"""Model- and pipeline-parallel training from a config: `plait train CONFIG.toml --nproc N`.

    plait train examples/pipeline.toml --nproc 4                       4 ranks: 4 stages, or 2 replicas × 2 stages
    plait train examples/pipeline.toml --nproc 2 --set parallel.stages=2 --set parallel.schedule=gpipe
    plait train examples/pipeline.toml --nproc 4 --resume              continue from the last checkpoint
    torchrun --nproc-per-node 4 -m plait.cli train examples/pipeline.toml
    torchrun --nproc-per-node 4 --max-restarts 1 -m plait.cli train examples/pipeline.toml

The training loop is the plane's (`plait.parallel.pipeline_train`); this module owns the run directory. Spawned
here, the ranks share the one this process prepares; under torchrun every rank keeps one of its own (its node may
have no other), the ranks agree whether to resume, and a group that torchrun restarted resumes by itself. The last
stage of replica 0 has the loss, so its `Run` writes the records; every rank keeps its stage's checkpoint files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape

from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, check_resumed_settings, prepare_run_dir
from plait.parallel.device import rank_device, use_device
from plait.parallel.launch import RankFailed, group_restarted, run_from_env, spawn_ranks, under_torchrun
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.groups import PipelineLayout
from plait.parallel.pipeline.schedule import build_schedule
from plait.parallel.pipeline_train import check_config_code, metrics_rank, train_rank
from plait.settings.config import from_dict, read_config, to_dict


def load_config(config_path: Path, overrides: list[str]) -> PipelineRunConfig:
    return read_config(PipelineRunConfig, config_path, overrides)


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    """`plait train` for parallel.mode = "model" | "pipeline": spawns `nproc` local ranks, or, under torchrun
    (`torchrun --nproc-per-node N -m plait.cli train CONFIG`), runs this process's rank."""
    console = Console()

    def usage_error(message: str) -> NoReturn:
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        raise SystemExit(2)

    if under_torchrun():
        try:
            config = load_config(config_path, overrides)
            check_config_code(config)
            run_from_env(rank_main, to_dict(config), str(Path(config.run.root) / config.run.name), resume, True)
        except (ValueError, FileNotFoundError, FileExistsError) as err:  # a setting wrong for this rank (see
            # RankFailed), a refused resume or run directory: each rank says it, exit 2
            usage_error(str(err))
        return
    try:
        config = load_config(config_path, overrides)
        PipelineLayout(replicas=config.parallel.replicas, stages=config.parallel.stages).check_world(nproc)
        check_config_code(config)  # the user's model and data, before anything is written
        run = prepare_run_dir(config.run.root, config.run.name, resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # ConfigError is a ValueError
        usage_error(str(err))
    if allreduce not in (None, "native"):
        warnings.warn(f"--allreduce {allreduce} is ignored: pipeline replicas average gradients with the backend's "
                      "native all-reduce", stacklevel=2)
    schedule = build_schedule(config.parallel.schedule, config.parallel.stages,  # both counts set by the section
                              config.parallel.micro_batches or 1, config.parallel.chunks_per_rank or 1)
    console.print(str(schedule), markup=False, highlight=False)
    try:
        results = spawn_ranks(rank_main, nproc, to_dict(config), str(run.path), resume, timeout_s=24 * 3600.0,
                              threads_per_rank=config.run.threads)
    except RankFailed as err:
        if not err.setting:
            raise
        usage_error(err.message)
    final = next(r for r in results if r is not None)
    console.print(f"step {final.get('step')}: loss {final.get('train_loss', float('nan')):.4f}"
                  + (f", test accuracy {final['test_accuracy']:.4f}" if "test_accuracy" in final else ""))
    console.print(f"run directory: {run.path}")
    for path in plot_run(run.path):
        console.print(f"plot: {path}")


def rank_main(rank: int, world_size: int, raw_config: dict[str, Any], run_path: str, resume: bool,
              prepare: bool = False) -> dict[str, Any] | None:
    """One rank: its run (`prepare`: under torchrun, where this rank prepares its own), then the plane's loop."""
    config = from_dict(PipelineRunConfig, raw_config)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    use_device(rank_device())  # NCCL's collectives below run on this rank's GPU
    run_dir = RunDir(Path(run_path))
    if prepare:
        run_dir, resume = prepare_under_torchrun(config, resume)
    run_dir.write_pid(rank)
    with Run(run_dir, resume=resume, step_key="step", total=config.train.steps, description="steps",
             writes=rank == metrics_rank(config), checkpoint_every=config.train.checkpoint_every or config.train.steps,
             tensorboard=config.run.tensorboard, config=config) as run:
        return train_rank(rank, world_size, config, run)


def _flags_of_all_ranks(flag: bool, device: torch.device) -> list[bool]:
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return [bool(f) for f in flags]


def prepare_under_torchrun(config: PipelineRunConfig, resume: bool) -> tuple[RunDir, bool]:
    """Under torchrun: decide together whether this start resumes, and prepare the run directory on every node.

    A group that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes by itself when any rank holds a
    checkpoint, and starts over when none does (it died before its first). The resolved config goes into every
    run directory that has none, and rank 0's on `--resume` (the settings the run goes on with)."""
    device = rank_device()  # where a tensor for a collective lives: the GPU under NCCL, the CPU under gloo
    restarts = int(group_restarted())
    run = RunDir(Path(config.run.root) / config.run.name)
    holding = _flags_of_all_ranks(run.checkpoint_path.exists(), device)
    resuming = resume or (restarts > 0 and any(holding))
    if resuming and not any(holding):
        raise FileNotFoundError(f"--resume: no rank finds {run.checkpoint_path} in its run directory")
    if restarts > 0 and not resuming:
        run.metrics_path.unlink(missing_ok=True)  # the group died before its first checkpoint: start over
    refusal: list[Any] = [None]  # rank 0's (usage error?, message), sent to every rank so each says the same
    if dist.get_rank() == 0:
        try:
            if not resuming:
                prepare_run_dir(config.run.root, config.run.name, resume=False).write_config(config)  # refuses a run
            elif run.config_path.exists():
                check_resumed_settings(run, config)  # refuses another experiment; before the config is replaced
        except (ValueError, FileExistsError) as err:  # a usage error: every rank says so, exit 2
            refusal[0] = (True, str(err))
        except OSError as err:
            refusal[0] = (False, str(err))
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        usage, said = refusal[0]
        raise ValueError(said) if usage else RuntimeError(said)
    run.path.mkdir(parents=True, exist_ok=True)  # on every node: each rank writes its own files there
    # a node that never held this run gets the config; rank 0 writes a resume's (the settings it goes on with)
    if not run.config_path.exists() or (resume and dist.get_rank() == 0):
        run.write_config(config)
    return run, resuming
