"""Model- and pipeline-parallel training from a config: `plait train CONFIG.toml --nproc N`.

    plait train examples/pipeline.toml --nproc 4                       4 ranks: 4 stages, or 2 replicas × 2 stages
    plait train examples/pipeline.toml --nproc 2 --set parallel.stages=2 --set parallel.schedule=gpipe
    plait train examples/pipeline.toml --nproc 4 --resume              continue from the last checkpoint
    torchrun --nproc-per-node 4 -m plait.cli train examples/pipeline.toml
    torchrun --nproc-per-node 4 --max-restarts 1 -m plait.cli train examples/pipeline.toml

Every rank builds the whole model from the seed (so all start from the same weights), keeps its stage and drops the
rest, moves it to its device (`cuda:LOCAL_RANK` under NCCL, else the CPU: device.py), and reads the same seeded
batches: stage 0 uses the images, the last stage the labels. The last stage of replica 0 writes metrics.jsonl.
Every rank keeps its stage's checkpoints in its own run directory, and a group that torchrun restarted resumes from
them by itself (pipeline/checkpoints.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.data.images import load_image_set
from plait.experiment.plots import plot_run
from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.experiment.sinks import MetricSinks
from plait.parallel.device import rank_device, use_device
from plait.parallel.launch import run_from_env, spawn_ranks
from plait.parallel.optim import build_optimizer, optimizer_name, state_matches
from plait.parallel.pipeline.checkpoints import (
    agreed_step,
    fetch_missing_stage_files,
    prepare_under_torchrun,
    save_stage_checkpoint,
    stage_file,
)
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.groups import PipelineLayout, ReplicaGroups
from plait.parallel.pipeline.inference import pipelined_predict
from plait.parallel.pipeline.model import build_sequential
from plait.parallel.pipeline.partition import as_layers, balance_by_params, balance_by_time, split_layers
from plait.parallel.pipeline.schedule import build_schedule, dry_run
from plait.parallel.pipeline.stage import PipelineStage
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import elapsed_so_far, truncate_metrics
from plait.settings.config import apply_overrides, from_dict, load_toml, to_dict


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


def choose_boundaries(config: PipelineRunConfig, model: torch.nn.Sequential, sample: torch.Tensor,
                      device: torch.device) -> list[int]:
    par = config.parallel
    if par.partition == "explicit":
        return list(par.boundaries)
    if par.partition == "params":
        return balance_by_params(model, par.stages)
    # Profiling is noisy: rank 0 measures, every rank uses its answer (different splits would not fit together).
    bounds = torch.zeros(max(par.stages - 1, 1), dtype=torch.int64, device=device)  # NCCL broadcasts device tensors
    if dist.get_rank() == 0:
        bounds[:par.stages - 1] = torch.tensor(balance_by_time(model, sample, par.stages), dtype=torch.int64,
                                               device=device)
    dist.broadcast(bounds, src=0)
    return bounds[:par.stages - 1].tolist()


def train_rank(rank: int, world_size: int, raw_config: dict[str, Any], run_path: str, resume: bool,
               prepare: bool = False) -> dict[str, Any] | None:
    """One rank of a model/pipeline-parallel run. Returns the final metrics on the metrics rank, else None."""
    config = from_dict(PipelineRunConfig, raw_config)
    par, train = config.parallel, config.train
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    run = RunDir(Path(run_path))
    if prepare:  # under torchrun: the ranks agree on resuming; every node gets a run directory
        run, resume = prepare_under_torchrun(config.run.root, config.run.name, lambda r: r.write_config(config),
                                             resume)
    pid_dir = run.path / "ranks"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))  # lets an operator (or a test) kill one rank
    device = rank_device()
    use_device(device)
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
    boundaries = choose_boundaries(config, model, sample, device)
    module = split_layers(as_layers(model), boundaries)[stage_index].to(device)
    del model
    optimizer = build_optimizer(module.parameters(), train.optimizer, lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay, betas=(train.beta1, train.beta2), eps=train.eps)
    stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if placement.is_last else None,
                          recompute=par.recompute, precision=train.precision, device=device)

    start = 0
    if resume:
        start = agreed_step(run, boundaries, par.stages)
        fetch_missing_stage_files(run, stage_index, start, par.stages)  # a rank torchrun placed on another node
        state = load_checkpoint(stage_file(run, stage_index, start))
        module.load_state_dict(state["model"])
        # stage files from before the optimizer choice were SGD's
        if state_matches(state.get("optimizer", "sgd"), train.optimizer, say=rank == 0):
            optimizer.load_state_dict(state["optim"])

    metrics_rank = layout.rank_of(0, par.stages - 1)
    log = None
    if rank == metrics_rank:
        if resume:
            truncate_metrics(run.metrics_path, "step", start)  # steps after the checkpoint are redone, not doubled
        log = MetricSinks(run.path, "step", resume_after=start if resume else None,
                          tensorboard=config.run.tensorboard)  # jsonl, csv, TensorBoard
    final: dict[str, Any] = {}
    started = time.perf_counter() - (elapsed_so_far(run.metrics_path) if log is not None and resume else 0.0)
    stack = contextlib.ExitStack()
    bar = stack.enter_context(progress_bar("steps", train.steps, start, enabled=log is not None))
    try:
        for step in range(start, train.steps):
            idx = batches.indices(step)[replica * per_replica:(replica + 1) * per_replica]
            inputs = images_to_float(train_x[idx]).to(device) if placement.is_first else None
            targets = train_y[idx].to(device) if placement.is_last else None
            optimizer.zero_grad(set_to_none=True)
            record = stage.train_step(schedule, per_replica, inputs, targets)
            groups.allreduce_grads(module).wait()  # replicas of this stage agree before anyone steps
            optimizer.step()
            done = step + 1
            if done % train.log_every == 0 or done == train.steps:
                # bubble of this step: idle share of all ranks between the first start and the last end
                span = torch.tensor([record.end, -record.start, record.busy], dtype=torch.float64, device=device)
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
                inputs = images_to_float(test_x[:count]).to(device) if placement.is_first else None
                logits = pipelined_predict(stage, count, chunk=1000, micro_batches=par.micro_batches, inputs=inputs)
                if log is not None:
                    accuracy = float((logits.argmax(1) == test_y[:count].to(device)).float().mean())
                    final = {**final, "accuracy": accuracy}
                    log.write({"step": done, "accuracy": accuracy, "elapsed_s": time.perf_counter() - started})
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == train.steps:
                save_stage_checkpoint(run, stage_index, done, {"model": module.state_dict(),
                                                               "optim": optimizer.state_dict(),
                                                               "optimizer": optimizer_name(optimizer)},
                                      boundaries, par.stages)
    finally:
        stack.close()
        if log is not None:
            log.close()
    return final if rank == metrics_rank else None


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    """`plait train` for parallel.mode = "model" | "pipeline": spawns `nproc` local ranks, or, under torchrun
    (`torchrun --nproc-per-node N -m plait.cli train CONFIG`), runs this process's rank."""
    from rich.console import Console

    from plait.parallel.train import under_torchrun

    console = Console()
    if under_torchrun():
        config = load_config(config_path, overrides)
        run_from_env(train_rank, to_dict(config), str(Path(config.run.root) / config.run.name), resume, True)
        return
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
    for path in plot_run(run.path):
        console.print(f"plot: {path}")
