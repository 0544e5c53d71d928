"""A pipeline's checkpoints when every rank keeps its own run directory (no shared file system needed).

At a checkpoint each rank writes its stage's file, `stage<s>.step<N>.pt`, and once every rank has (a barrier) its
own `checkpoint.pt` naming the step: per-rank files under `run.path`, written by every rank whether or not its run
writes the records. On a resume (--resume, or a group that torchrun restarted; the driver decides it):

- the ranks go on from the latest step every rank that holds a checkpoint has committed (a rank killed between two
  ranks' commits is one step behind; the stage files of the step before stay until the next commit for it);
- a rank that finds no file of its stage for that step (torchrun placed it on another node than before) receives
  it from a rank that holds it: the files of a stage need only survive on some node;
- a stage whose file no rank holds is an error on every rank, never a silent start over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.parallel.device import rank_device
from plait.parallel.file_transfer import transfer_file
from plait.runtime.checkpoint import CHECKPOINT_FILE, save_checkpoint
from plait.runtime.context import RunContext

NO_CHECKPOINT = 2**62  # a rank without checkpoint.pt, in the MIN over the ranks' committed steps


def stage_file(run_path: Path, stage: int, step: int) -> Path:
    return run_path / f"stage{stage}.step{step}.pt"


def _comm() -> torch.device:
    """Where a tensor for a collective lives: the rank's GPU under NCCL, the CPU under gloo."""
    return rank_device()


def agreed_step(run: RunContext, boundaries: list[int], num_stages: int) -> int:
    """The latest step every rank holding a checkpoint has committed (collective: every rank calls it)."""
    committed = NO_CHECKPOINT
    try:
        ckpt = run.load()
    except FileNotFoundError:  # this rank's node never held the run: others have
        ckpt = None
    if ckpt is not None:
        if ckpt["boundaries"].tolist() != boundaries or int(ckpt["stages"]) != num_stages:
            raise ValueError(f"--resume: the checkpoint's split {ckpt['boundaries'].tolist()} differs from this "
                             f"run's {boundaries}; keep parallel.stages and parallel.partition")
        committed = int(ckpt["step"])
    step = torch.tensor([committed], dtype=torch.int64, device=_comm())
    dist.all_reduce(step, op=dist.ReduceOp.MIN)  # a rank killed between the commits of two ranks is one behind
    if int(step) == NO_CHECKPOINT:
        raise FileNotFoundError(f"--resume: no rank finds {run.path / CHECKPOINT_FILE} in its run directory")
    return int(step)


def fetch_missing_stage_files(run_path: Path, stage_index: int, step: int, num_stages: int) -> list[int]:
    """Give every rank its stage's file of `step`, sent by the lowest rank holding it when its own run directory
    has none (collective). Returns the ranks that received one."""
    world, rank = dist.get_world_size(), dist.get_rank()
    held = torch.zeros(world, num_stages, dtype=torch.int64, device=_comm())
    for stage in range(num_stages):
        held[rank, stage] = int(stage_file(run_path, stage, step).exists())
    stage_of = torch.zeros(world, dtype=torch.int64, device=_comm())
    stage_of[rank] = stage_index
    dist.all_reduce(held)
    dist.all_reduce(stage_of)
    received = []
    for dst in range(world):  # the same plan on every rank: each transfer is one send/recv pair, in order
        stage = int(stage_of[dst])
        if held[dst, stage]:
            continue
        holders = [r for r in range(world) if held[r, stage]]
        if not holders:
            raise FileNotFoundError(f"--resume: no rank holds stage{stage}.step{step}.pt (rank {dst}'s stage) in "
                                    f"its run directory {run_path}; not starting over")
        if rank in (holders[0], dst):
            transfer_file(stage_file(run_path, stage, step), holders[0], dst)
        received.append(dst)
    return received


def save_stage_checkpoint(run_path: Path, stage_index: int, step: int, state: dict[str, Any], boundaries: list[int],
                          num_stages: int) -> None:
    """Every rank writes its stage's file into its own run directory (replicas of a stage write the same bytes;
    on a shared directory the atomic rename keeps one), then, once every rank has, commits the step."""
    save_checkpoint(stage_file(run_path, stage_index, step), state)
    dist.barrier()  # every stage file of this step is on disk before any checkpoint names the step
    save_checkpoint(run_path / CHECKPOINT_FILE, {"step": step, "stages": num_stages,
                                                 "boundaries": torch.tensor(boundaries, dtype=torch.int64)})
    # Keep this step and the one before: a rank killed before its commit resumes there (see agreed_step).
    steps = sorted(int(p.name.split(".step")[1][:-3]) for p in run_path.glob(f"stage{stage_index}.step*.pt"))
    keep = {step, max((s for s in steps if s < step), default=step)}
    for old in steps:
        if old not in keep:
            stage_file(run_path, stage_index, old).unlink(missing_ok=True)
