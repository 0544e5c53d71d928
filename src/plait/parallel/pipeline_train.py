"""Model- and pipeline-parallel training from a config: `plait train CONFIG.toml --nproc N`.

    plait train examples/pipeline.toml --nproc 4                       4 ranks: 4 stages, or 2 replicas × 2 stages
    plait train examples/pipeline.toml --nproc 2 --set parallel.stages=2 --set parallel.schedule=gpipe
    plait train examples/pipeline.toml --nproc 4 --resume              continue from the last checkpoint
    torchrun --nproc-per-node 4 -m plait.parallel.pipeline_train examples/pipeline.toml
    torchrun --nproc-per-node 4 --max-restarts 1 -m plait.parallel.pipeline_train examples/pipeline.toml

Every rank builds the whole model from the seed (so all start from the same weights), keeps its stage and drops the
rest, and reads the same seeded batches: stage 0 uses the images, the last stage the labels. The last stage of
replica 0 writes metrics.jsonl. At a checkpoint every rank writes its stage's file and, once all have, its own
`checkpoint.pt`, which names the step the stage files belong to: a rank needs only its own run directory, so the
ranks' directories need not be shared. A resumed run (--resume, or a group torchrun restarted) goes on from the
latest step every rank has committed; the stage files of the step before stay until the next commit for that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.data.images import load_image_set
from plait.experiment.checkpoint import load_checkpoint, save_checkpoint
from plait.experiment.config import apply_overrides, from_dict, load_toml, to_dict
from plait.experiment.metrics import MetricsLog, elapsed_so_far, truncate_metrics
from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.parallel.launch import run_from_env, spawn_ranks
from plait.parallel.optim import build_optimizer, optimizer_name, state_matches
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.groups import PipelineLayout, ReplicaGroups
from plait.parallel.pipeline.inference import pipelined_predict
from plait.parallel.pipeline.model import build_sequential
from plait.parallel.pipeline.partition import as_layers, balance_by_params, balance_by_time, split_layers
from plait.parallel.pipeline.schedule import build_schedule, dry_run
from plait.parallel.pipeline.stage import PipelineStage


def load_config(config_path: Path, overrides: list[str]) -> PipelineRunConfig:
    return from_dict(PipelineRunConfig, apply_overrides(load_toml(config_path), overrides))


class SeededBatches:
    """Batch `step` of a seeded shuffle, epoch after epoch (drop-last): the same on every rank and after a resume."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise ValueError(f"data.batch_size = {batch_size} exceeds the {num_examples} training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=gen)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def images_to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.unsqueeze(1).to(torch.float32).div_(255.0)  # [N, 1, 28, 28] in [0, 1]


def choose_boundaries(config: PipelineRunConfig, model: torch.nn.Sequential, sample: torch.Tensor) -> list[int]:
    par = config.parallel
    if par.partition == "explicit":
        return list(par.boundaries)
    if par.partition == "params":
        return balance_by_params(model, par.stages)
    # Profiling is noisy: rank 0 measures, every rank uses its answer (different splits would not fit together).
    bounds = torch.zeros(max(par.stages - 1, 1), dtype=torch.int64)
    if dist.get_rank() == 0:
        bounds[:par.stages - 1] = torch.tensor(balance_by_time(model, sample, par.stages), dtype=torch.int64)
    dist.broadcast(bounds, src=0)
    return bounds[:par.stages - 1].tolist()


def _stage_file(run: RunDir, stage: int, step: int) -> Path:
    return run.path / f"stage{stage}.step{step}.pt"


def _flags_of_all_ranks(flag: bool) -> list[bool]:
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return [bool(f) for f in flags]


def _prepare_under_torchrun(config: PipelineRunConfig, rank: int, resume: bool) -> tuple[RunDir, bool]:
    """Under torchrun: decide together whether this start resumes, and prepare the run directory (rank 0).

    A group that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes by itself when its ranks hold a
    checkpoint, and starts over when none does (it died before the first). Some ranks with a checkpoint and others
    without (a rank that came back on a node that never held its run directory) is an error, never a silent start
    over."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run = RunDir(Path(config.run.root) / config.run.name)
    holding = _flags_of_all_ranks(run.checkpoint_path.exists())
    resuming = resume or (restarts > 0 and any(holding))
    if resuming and not all(holding):
        missing = [r for r, held in enumerate(holding) if not held]
        raise RuntimeError(f"pipeline resume: ranks {missing} find no {run.checkpoint_path} in their run directory "
                           "(each rank keeps its own; was a rank moved to another node?); not starting over")
    if restarts > 0 and not resuming:
        run.metrics_path.unlink(missing_ok=True)  # the group died before its first checkpoint: start over
    status = torch.zeros(1, dtype=torch.int64)
    error = ""
    if rank == 0:
        try:
            run = prepare_run_dir(config.run.root, config.run.name, resuming)
            if not resuming:
                run.write_config(config)
            status[0] = 1
        except (FileExistsError, FileNotFoundError, OSError) as err:
            error = str(err)
    dist.broadcast(status, src=0)
    if not status[0]:
        raise RuntimeError(error or "rank 0 could not prepare the run directory")
    run.path.mkdir(parents=True, exist_ok=True)  # on every node: each rank writes its own files there
    return run, resuming


def _agreed_step(run: RunDir, stage_index: int, boundaries: list[int], num_stages: int) -> int:
    """The latest step every rank has committed; every rank checks it holds its stage's file of that step."""
    ckpt = load_checkpoint(run.checkpoint_path)
    if ckpt["boundaries"].tolist() != boundaries or int(ckpt["stages"]) != num_stages:
        raise ValueError(f"--resume: the checkpoint's split {ckpt['boundaries'].tolist()} differs from this "
                         f"run's {boundaries}; keep parallel.stages and parallel.partition")
    step = torch.tensor([int(ckpt["step"])], dtype=torch.int64)
    dist.all_reduce(step, op=dist.ReduceOp.MIN)  # a rank killed between the commits of two ranks is one behind
    holding = _flags_of_all_ranks(_stage_file(run, stage_index, int(step)).exists())
    if not all(holding):
        missing = [r for r, held in enumerate(holding) if not held]
        raise FileNotFoundError(f"--resume: ranks {missing} lack their stage file of step {int(step)} "
                                f"(stage<s>.step{int(step)}.pt in their run directory {run.path})")
    return int(step)


def train_rank(rank: int, world_size: int, raw_config: dict[str, Any], run_path: str, resume: bool,
               prepare: bool = False) -> dict[str, Any] | None:
    """One rank of a model/pipeline-parallel run. Returns the final metrics on the metrics rank, else None."""
    config = from_dict(PipelineRunConfig, raw_config)
    par, train = config.parallel, config.train
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    run = RunDir(Path(run_path))
    if prepare:  # under torchrun: the ranks agree on resuming, rank 0 makes the run directory
        run, resume = _prepare_under_torchrun(config, rank, resume)
    pid_dir = run.path / "ranks"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))  # lets an operator (or a test) kill one rank
    layout = PipelineLayout(replicas=par.replicas, stages=par.stages)
    layout.check_world(world_size)
    replica, stage_index = layout.coords(rank)
    placement = layout.placement(rank)
    groups = ReplicaGroups(layout, rank)
    schedule = build_schedule(par.schedule, par.stages, par.micro_batches)
    dry_run(schedule)  # a schedule that would deadlock fails here, on every rank, before any message is sent

    arrays = load_image_set(config.data.name, config.data.path)
    train_x, train_y = torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"])
    test_x, test_y = torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"])
    batches = SeededBatches(len(train_x), config.data.batch_size, config.run.seed)
    per_replica = config.data.batch_size // par.replicas

    torch.manual_seed(config.run.seed)  # same initial weights on every rank, and as a single process
    model = build_sequential(config.model.name, config.model.depth, config.model.hidden)
    sample = images_to_float(train_x[:per_replica // par.micro_batches])
    boundaries = choose_boundaries(config, model, sample)
    module = split_layers(as_layers(model), boundaries)[stage_index]
    del model
    optimizer = build_optimizer(module.parameters(), train.optimizer, lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay, betas=(train.beta1, train.beta2), eps=train.eps)
    stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if placement.is_last else None,
                          recompute=par.recompute)

    start = 0
    if resume:
        start = _agreed_step(run, stage_index, boundaries, par.stages)
        state = load_checkpoint(_stage_file(run, stage_index, start))
        module.load_state_dict(state["model"])
        # stage files from before the optimizer choice were SGD's
        if state_matches(state.get("optimizer", "sgd"), train.optimizer, say=rank == 0):
            optimizer.load_state_dict(state["optim"])

    metrics_rank = layout.rank_of(0, par.stages - 1)
    log = None
    if rank == metrics_rank:
        if resume:
            truncate_metrics(run.metrics_path, "step", start)  # steps after the checkpoint are redone, not doubled
        log = MetricsLog(run.metrics_path)
    final: dict[str, Any] = {}
    started = time.perf_counter() - (elapsed_so_far(run.metrics_path) if log is not None and resume else 0.0)
    stack = contextlib.ExitStack()
    bar = stack.enter_context(progress_bar("steps", train.steps, start, enabled=log is not None))
    try:
        for step in range(start, train.steps):
            idx = batches.indices(step)[replica * per_replica:(replica + 1) * per_replica]
            inputs = images_to_float(train_x[idx]) if placement.is_first else None
            targets = train_y[idx] if placement.is_last else None
            optimizer.zero_grad(set_to_none=True)
            record = stage.train_step(schedule, per_replica, inputs, targets)
            groups.allreduce_grads(module).wait()  # replicas of this stage agree before anyone steps
            optimizer.step()
            done = step + 1
            if done % train.log_every == 0 or done == train.steps:
                # bubble of this step: idle share of all ranks between the first start and the last end
                span = torch.tensor([record.end, -record.start, record.busy], dtype=torch.float64)
                dist.all_reduce(span[:2], op=dist.ReduceOp.MAX)
                dist.all_reduce(span[2:], op=dist.ReduceOp.SUM)
                loss = groups.mean_over_replicas(record.loss) if placement.is_last else None
                if log is not None:
                    wall = float(span[0] + span[1])
                    final = {"step": done, "loss": float(loss), "step_seconds": wall,
                             "bubble": 1.0 - float(span[2]) / (world_size * wall),
                             "samples_per_s": config.data.batch_size / wall,
                             "elapsed_s": time.perf_counter() - started}
                    log.write(final)
                    bar.advance(done, f"loss {float(loss):.4f}, bubble {final['bubble']:.2f}")
            if replica == 0 and train.eval_every and (done % train.eval_every == 0 or done == train.steps):
                count = min(train.eval_examples, len(test_x))
                inputs = images_to_float(test_x[:count]) if placement.is_first else None
                logits = pipelined_predict(stage, count, chunk=1000, micro_batches=par.micro_batches, inputs=inputs)
                if log is not None:
                    accuracy = float((logits.argmax(1) == test_y[:count]).float().mean())
                    final = {**final, "accuracy": accuracy}
                    log.write({"step": done, "accuracy": accuracy, "elapsed_s": time.perf_counter() - started})
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == train.steps:
                _checkpoint(run, stage_index, done, module, optimizer, boundaries, par.stages)
    finally:
        stack.close()
        if log is not None:
            log.close()
    return final if rank == metrics_rank else None


def _checkpoint(run: RunDir, stage_index: int, step: int, module, optimizer, boundaries: list[int],
                num_stages: int) -> None:
    """Every rank writes its stage's file into its own run directory (replicas of a stage write the same bytes;
    on a shared directory the atomic rename keeps one), then, once every rank has, commits the step."""
    save_checkpoint(_stage_file(run, stage_index, step),
                    {"model": module.state_dict(), "optim": optimizer.state_dict(),
                     "optimizer": optimizer_name(optimizer)})
    dist.barrier()  # every stage file of this step is on disk before any checkpoint names the step
    save_checkpoint(run.checkpoint_path, {"step": step, "stages": num_stages,
                                          "boundaries": torch.tensor(boundaries, dtype=torch.int64)})
    # Keep this step and the one before: a rank killed before its commit resumes there (see _agreed_step).
    steps = sorted(int(p.name.split(".step")[1][:-3]) for p in run.path.glob(f"stage{stage_index}.step*.pt"))
    keep = {step, max((s for s in steps if s < step), default=step)}
    for old in steps:
        if old not in keep:
            _stage_file(run, stage_index, old).unlink(missing_ok=True)


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    """`plait train` for parallel.mode = "model" | "pipeline": spawns `nproc` local ranks."""
    from rich.console import Console

    console = Console()
    try:
        config = load_config(config_path, overrides)
        PipelineLayout(replicas=config.parallel.replicas, stages=config.parallel.stages).check_world(nproc)
        run = prepare_run_dir(config.run.root, config.run.name, resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # ConfigError is a ValueError
        console.print(f"[bold red]error:[/] {err}")
        raise SystemExit(2) from err
    if allreduce not in (None, "native"):
        warnings.warn(f"--allreduce {allreduce} is ignored: pipeline replicas average gradients with the backend's "
                      "native all-reduce", stacklevel=2)
    if not resume:
        run.write_config(config)
    schedule = build_schedule(config.parallel.schedule, config.parallel.stages, config.parallel.micro_batches)
    console.print(str(schedule), markup=False, highlight=False)
    results = spawn_ranks(train_rank, nproc, to_dict(config), str(run.path), resume, timeout_s=24 * 3600.0,
                          threads_per_rank=config.run.threads)
    final = next(r for r in results if r is not None)
    console.print(f"step {final.get('step')}: loss {final.get('loss', float('nan')):.4f}"
                  + (f", test accuracy {final['accuracy']:.4f}" if "accuracy" in final else ""))
    console.print(f"run directory: {run.path}")


def _torchrun_main(argv: list[str]) -> None:
    """`torchrun ... -m plait.parallel.pipeline_train CONFIG [--resume] [--set key=value ...]`."""
    if not argv:
        raise SystemExit("usage: torchrun --nproc-per-node N -m plait.parallel.pipeline_train CONFIG "
                         "[--resume] [--set key=value ...]")
    resume = "--resume" in argv
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set" and i + 1 < len(argv)]
    config = load_config(Path(argv[0]), overrides)
    run_path = str(Path(config.run.root) / config.run.name)
    run_from_env(train_rank, to_dict(config), run_path, resume, True)


if __name__ == "__main__":
    _torchrun_main(sys.argv[1:])
