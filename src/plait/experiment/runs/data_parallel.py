"""Data-parallel training: `plait train CONFIG.toml --nproc N`, or the same command under torchrun.

One node, N local ranks (spawned here, gloo on CPU):

    plait train examples/data_parallel.toml --nproc 2 [--allreduce ring] [--resume] [--set train.steps=500]

One node under torchrun (restarts the whole group from the last checkpoint if a rank dies, up to 3 times):

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 -m plait.cli train examples/data_parallel.toml

Two nodes (run on each; node 0's address reachable from node 1; rank 0's node holds the run directory, and a
rank 0 restarted on another node first receives the latest checkpoint from the node that holds it):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 2 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint NODE0_HOST:29400 --rdzv-id plait-dp -m plait.cli train examples/data_parallel.toml

Under torchrun `--nproc` is ignored (torchrun decides the world), and a restarted group resumes by itself. The
training loop is the plane's (`plait.parallel.train`); this module owns the run directory: rank 0 prepares it and
writes the records and checkpoints through its `Run`, the other ranks' `Run` writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from plait.experiment.plots import plot_run
from plait.experiment.run import Run
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.experiment.runs.rank0_files import bring_latest_checkpoint_to_rank0
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.device import rank_device, use_device
from plait.parallel.launch import RankFailed, group_restarted, run_from_env, spawn_ranks, under_torchrun
from plait.parallel.train import check_config_code, train_rank
from plait.runtime.metrics_log import last_logged
from plait.settings.config import ConfigError, apply_overrides, load_toml, typed


def load_config(config_path: Path, overrides: list[str], allreduce: str | None) -> DataParallelRunConfig:
    raw = apply_overrides(load_toml(config_path), overrides, DataParallelRunConfig)
    if allreduce is not None:
        raw.setdefault("parallel", {})["allreduce"] = allreduce
    return typed(DataParallelRunConfig, raw)


def _usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    try:
        config = load_config(config_path, overrides, allreduce)
        check_config_code(config)  # the user's model and data, before any rank starts or anything is written
    except (ConfigError, ValueError) as err:
        _usage_error(str(err))
    backend = None if config.parallel.backend == "auto" else config.parallel.backend
    if under_torchrun():
        try:
            summary = run_from_env(rank_main, config, resume, backend=backend)
        except ValueError as err:  # a setting this rank found wrong (see RankFailed): each rank says it, exit 2
            _usage_error(str(err))
    else:
        if nproc < 1:
            _usage_error(f"--nproc must be >= 1, got {nproc}")
        try:
            config.check_world(nproc)
            # checked here too, so a mistake fails before any rank is spawned (a run that wrote nothing is none)
            prepare_run_dir(config.run.root, config.run.name, resume)
            summary = spawn_ranks(rank_main, nproc, config, resume, backend=backend, timeout_s=float("inf"),
                                  threads_per_rank=config.parallel.threads_per_rank)[0]
        except RankFailed as err:
            if not err.setting:
                raise
            _usage_error(err.message)
        except (ValueError, FileExistsError, FileNotFoundError) as err:
            _usage_error(str(err))
    if summary:
        if summary["resumed_at"] == summary["steps"]:  # a finished run resumed: no step ran; its logged figures
            print(f"the run had done its {summary['steps']} steps already (raise train.steps to go on)")
            summary.update(last_logged(RunDir(Path(summary["run_dir"])).metrics_path, ("train_loss", "test_accuracy")))
        acc = summary.get("test_accuracy")
        print(f"steps: {summary['steps']}  final loss: {summary['train_loss']:.4f}"
              + (f"  test accuracy: {acc:.4f}" if acc is not None else "")
              + f"  ({summary['seconds']:.1f} s)")
        print(f"run directory: {summary['run_dir']}")
        for path in plot_run(summary["run_dir"]):
            print(f"plot: {path}")


def rank_main(rank: int, world_size: int, config: DataParallelRunConfig, resume: bool) -> dict[str, Any] | None:
    """One rank: its run (rank 0's writes), then the plane's loop. Rank 0 returns the summary."""
    config.check_world(world_size)
    device = rank_device()  # the status broadcast below is NCCL's first collective: on this rank's GPU
    use_device(device)
    run_dir, resuming = _prepare_run(config, resume, rank, device)
    run_dir.write_pid(rank)
    with Run(run_dir, resume=resuming, step_key="step", total=config.train.steps, description="steps",
             writes=rank == 0, checkpoint_every=config.train.checkpoint_every or config.train.steps,
             tensorboard=config.run.tensorboard, config=config) as run:
        summary = train_rank(rank, world_size, config, run)
    return None if summary is None else {**summary, "run_dir": str(run_dir.path)}


def _prepare_run(config: DataParallelRunConfig, resume: bool, rank: int,
                 device: torch.device) -> tuple[RunDir, bool]:
    """Rank 0 prepares the run directory; every rank learns whether a checkpoint is resumed. A group that torchrun
    restarted resumes from the checkpoint by itself (received from another node's rank if rank 0's node lacks it),
    or starts over when no node holds one (it died before the first)."""
    restarts = int(group_restarted())  # agreed: every rank takes the same path through the collectives below
    run = RunDir(Path(config.run.root) / config.run.name)
    if resume or restarts > 0:
        bring_latest_checkpoint_to_rank0(run)  # rank 0 may be on another node than the one that wrote it
    status = torch.zeros(2, dtype=torch.int64, device=device)  # [ok, resuming]; NCCL sends device tensors only
    error = ""
    if rank == 0:
        try:
            resuming = resume or (restarts > 0 and run.checkpoint_path.exists())
            if restarts > 0 and not resuming and run.metrics_path.exists():
                run.metrics_path.unlink()  # died before the first checkpoint: start over
            run = prepare_run_dir(config.run.root, config.run.name, resume=resuming)
            status[:] = torch.tensor([1, int(resuming)], device=device)
        except (FileExistsError, FileNotFoundError, OSError) as err:
            error = str(err)
    dist.broadcast(status, src=0)
    if not status[0]:
        raise RuntimeError(error or "rank 0 could not prepare the run directory")
    return run, bool(status[1])
