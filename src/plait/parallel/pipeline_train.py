"""Model- and pipeline-parallel training of one rank, in the run the driver hands it.

The driver (`plait.experiment.runs.pipeline`: `plait train examples/pipeline.toml --nproc 4`, or the same under
torchrun) prepares the run directory and hands every rank a `RunContext`; the last stage of replica 0 has the loss,
so its run writes the records. Every rank builds the whole model from the seed (so all start from the same
weights), keeps its stage and drops the rest (or, with `parallel.build = "meta"`, builds it on the meta device and
materialises only its stage: build_stage), moves it to its device (`cuda:LOCAL_RANK` under NCCL, else the CPU:
device.py), and reads the same seeded batches: stage 0 uses the images, the last stage the labels. Every rank keeps
its stage's checkpoints under its own `run.path`, and resumes from them (pipeline/checkpoints.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.components import RunData, check_user_code, load_run_data, unit_images
from plait.parallel.device import rank_device, use_device
from plait.parallel.divergence import DivergenceGuard
from plait.parallel.optim import current_lr, optimizer_name, state_matches
from plait.parallel.pipeline.checkpoints import (
    agreed_step,
    fetch_missing_stage_files,
    save_stage_checkpoint,
    stage_file,
)
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.groups import PipelineLayout, ReplicaGroups
from plait.parallel.pipeline.inference import pipelined_predict
from plait.parallel.pipeline.meta_init import (
    build_on_meta,
    check_initialisable,
    materialise,
    stage_layer_indices,
)
from plait.parallel.pipeline.model import build_pipeline_model, preset_layer_init
from plait.parallel.pipeline.partition import (
    as_layers,
    balance_by_params,
    balance_by_time,
    check_boundaries,
    split_layers,
)
from plait.parallel.pipeline.schedule import build_schedule, dry_run
from plait.parallel.pipeline.stage import PipelineStage, Placement, StepRecord
from plait.runtime.checkpoint import CHECKPOINT_FILE, load_checkpoint
from plait.runtime.context import RunContext
from plait.runtime.divergence import Diverged
from plait.user_model import task_loss


def metrics_rank(config: PipelineRunConfig) -> int:
    """The rank whose run writes the records: the last stage of replica 0, where the loss is."""
    layout = PipelineLayout(replicas=config.parallel.replicas, stages=config.parallel.stages)
    return layout.rank_of(0, config.parallel.stages - 1)


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


def load_data(config: PipelineRunConfig) -> RunData:
    return load_run_data(config.data, name=config.data.name, path=config.data.path, prepare_images=unit_images)


def check_config_code(config: PipelineRunConfig) -> None:
    """At start, before the run directory: the user's model (when named) cuts into the configured stages, and it
    and the data fit together and fit `train.task`'s loss. ValueError naming the setting otherwise."""
    if not (config.model.factory or config.data.source):
        return
    par = config.parallel
    with torch.random.fork_rng(devices=[]):  # the ranks draw the initial weights from the seed, untouched
        model = build_pipeline_model(config.model) if par.build == "full" else \
            build_on_meta(lambda: build_pipeline_model(config.model))  # meta: the check holds no weights either
    layers, pieces = len(as_layers(model)), par.stages * (par.chunks_per_rank or 1)
    if layers < pieces:
        what = f"parallel.stages × parallel.chunks_per_rank = {pieces}" if pieces != par.stages else \
            f"parallel.stages = {par.stages}"
        setting = f"model.factory = {config.model.factory!r}" if config.model.factory else \
            f"model.name = {config.model.name!r}"
        raise ValueError(f"{setting} gives {layers} layers, fewer than {what}: every (virtual) stage needs at least "
                         "one layer")
    if par.partition == "explicit":
        check_boundaries(par.boundaries, layers, pieces)
    if par.build == "meta":
        for index, layer in enumerate(as_layers(model)):
            check_initialisable(layer, index)
    check_user_code(model, config.model, load_data(config), config.train.task,
                    sample_device=torch.device("meta") if par.build == "meta" else None)


def choose_boundaries(config: PipelineRunConfig, model: torch.nn.Sequential, sample: torch.Tensor,
                      device: torch.device) -> list[int]:
    par = config.parallel
    if par.partition == "explicit":
        return list(par.boundaries)
    pieces = par.stages * (par.chunks_per_rank or 1)  # virtual stages: chunks_per_rank of them on every rank
    if par.partition == "params":
        return balance_by_params(model, pieces)
    # Profiling is noisy: rank 0 measures, every rank uses its answer (different splits would not fit together).
    bounds = torch.zeros(max(pieces - 1, 1), dtype=torch.int64, device=device)  # NCCL broadcasts device tensors
    if dist.get_rank() == 0:
        bounds[:pieces - 1] = torch.tensor(balance_by_time(model, sample, pieces), dtype=torch.int64, device=device)
    dist.broadcast(bounds, src=0)
    return bounds[:pieces - 1].tolist()


def build_stage(config: PipelineRunConfig, sample: torch.Tensor, stage_index: int,
                device: torch.device) -> tuple[nn.Module, list[int]]:
    """This rank's stage, on `device`, and the run's boundaries. `parallel.build = "full"`: the whole model is built
    from the seed (the same initial weights on every rank, and as a single process), then cut; "meta": it is built
    on the meta device, cut, and only this stage's layers get memory and their seeded weights (meta_init.py)."""
    par = config.parallel
    torch.manual_seed(config.run.seed)
    if par.build == "full":
        model = build_pipeline_model(config.model)
        boundaries = choose_boundaries(config, model, sample, device)
    else:
        model = build_on_meta(lambda: build_pipeline_model(config.model))
        boundaries = choose_boundaries(config, model, sample, device)  # by parameter count or explicit: shapes do
        count = len(as_layers(model))
        materialise(model, seed=config.run.seed, device=device, extra=preset_layer_init(config.model, count),
                    indices=stage_layer_indices(boundaries, count, stage_index, par.stages))
    return stage_module(split_layers(as_layers(model), boundaries), stage_index, par.stages).to(device), boundaries


def layer_names(config: PipelineRunConfig) -> list[str]:
    """The names of the whole model's layers (its state_dict's first parts), from a copy built on the meta device."""
    model = build_on_meta(lambda: build_pipeline_model(config.model))
    if isinstance(model, nn.Sequential):
        return [name for name, _ in model.named_children()]
    return [str(index) for index in range(len(as_layers(model)))]


def whole_model_part(module: nn.Module, boundaries: list[int], stage_index: int, num_stages: int,
                     names: list[str]) -> dict[str, torch.Tensor]:
    """This stage's tensors under the whole model's names (`names`: layer_names), on the CPU: the stage's pieces
    stage_index, stage_index + num_stages, ... each hold the layers between two boundaries."""
    pieces = list(module) if isinstance(module, nn.ModuleList) else [module]  # ModuleList: chunks per rank
    edges = [0, *boundaries, len(names)]
    out = {}
    for piece_index, piece in zip(range(stage_index, len(edges) - 1, num_stages), pieces):
        for offset, layer in enumerate(piece):
            prefix = names[edges[piece_index] + offset]
            out.update({f"{prefix}.{key}": value.detach().cpu() for key, value in layer.state_dict().items()})
    return out


def _save_whole_model(run: RunContext, config: PipelineRunConfig, module: nn.Module, boundaries: list[int],
                      replica: int, stage_index: int) -> None:
    """Replica 0's stages send their parts to the rank that writes the run, which saves the whole model's
    state_dict as the run's model.safetensors (collective: every rank calls it)."""
    part = whole_model_part(module, boundaries, stage_index, config.parallel.stages, layer_names(config)) \
        if replica == 0 else {}
    parts: list[Any] | None = [None] * dist.get_world_size() if run.writes else None
    dist.gather_object(part, parts, dst=metrics_rank(config))
    if parts is not None:
        run.save_model({name: tensor for got in parts for name, tensor in got.items()})


def stage_module(pieces: list[nn.Sequential], stage_index: int, num_stages: int) -> nn.Module:
    """The stage's piece, or, with chunks per rank, its pieces stage_index, stage_index + p, ... as a ModuleList."""
    if len(pieces) == num_stages:
        return pieces[stage_index]
    return nn.ModuleList(pieces[stage_index::num_stages])


def _log_step(run: RunContext, record: StepRecord, groups: ReplicaGroups, placement: Placement,
              config: PipelineRunConfig, world_size: int, optimizer: torch.optim.Optimizer, started: float,
              done: int) -> dict[str, Any]:
    """The step's record (collective: the bubble is measured over every rank); written where the run writes."""
    device = rank_device()
    # bubble of this step: idle share of all ranks between the first start and the last end
    span = torch.tensor([record.end, -record.start, record.busy], dtype=torch.float64, device=device)
    dist.all_reduce(span[:2], op=dist.ReduceOp.MAX)
    dist.all_reduce(span[2:], op=dist.ReduceOp.SUM)
    loss = groups.mean_over_replicas(record.loss) if placement.is_last else None
    if not run.writes:
        return {}
    wall = float(span[0] + span[1])
    final = {"step": done, "train_loss": float(loss), "step_seconds": wall,
             "bubble": 1.0 - float(span[2]) / (world_size * wall),
             "samples_per_s": config.data.batch_size / wall, "lr": current_lr(optimizer),
             "elapsed_s": time.perf_counter() - started, "time": time.time()}
    run.write(final)
    run.progress(done, f"loss {final['train_loss']:.4f}, bubble {final['bubble']:.2f}")
    return final


def _evaluate(stage: PipelineStage, data: RunData, config: PipelineRunConfig, device: torch.device,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Pipelined inference over the test set (every stage of the replica takes part); the metrics where the
    outputs are, on the last stage ({} elsewhere)."""
    test = data.sets.test
    assert test is not None and isinstance(test.x, torch.Tensor)
    count = min(config.train.eval_examples, len(test))
    inputs = data.prepare(test.x[:count]).to(device) if stage.placement.is_first else None
    outputs = pipelined_predict(stage, count, chunk=1000, micro_batches=config.parallel.micro_batches, inputs=inputs)
    if outputs is None:
        return {}
    labels = test.y[:count].to(device)
    metrics = {"test_loss": float(loss_fn(outputs.float(), labels))}
    if config.train.task == "classification":
        metrics = {"test_accuracy": float((outputs.argmax(1) == labels).float().mean()), **metrics}
    return metrics


def train_rank(rank: int, world_size: int, config: PipelineRunConfig, run: RunContext) -> dict[str, Any] | None:
    """One rank of a model/pipeline-parallel run. Returns the final metrics where the run writes, else None."""
    par, train = config.parallel, config.train
    device = rank_device()
    use_device(device)
    layout = PipelineLayout(replicas=par.replicas, stages=par.stages)
    layout.check_world(world_size)
    replica, stage_index = layout.coords(rank)
    placement = layout.placement(rank)
    groups = ReplicaGroups(layout, rank)
    schedule = build_schedule(par.schedule, par.stages, par.micro_batches, par.chunks_per_rank or 1)
    dry_run(schedule)  # a schedule that would deadlock fails here, on every rank, before any message is sent

    data = load_data(config)
    train_x, train_y = data.sets.train_x, data.sets.train.y
    batches = SeededBatches(len(train_x), config.data.batch_size, config.run.seed)
    per_replica = config.data.batch_size // par.replicas

    sample = data.prepare(train_x[:per_replica // par.micro_batches])
    module, boundaries = build_stage(config, sample, stage_index, device)
    optimizer = train.build_optimizer(module.parameters())
    loss_fn = task_loss(train.task)
    stage = PipelineStage(module, placement, loss_fn=loss_fn if placement.is_last else None,
                          recompute=par.recompute, precision=train.precision, device=device)

    start = 0
    if run.resume:
        start = agreed_step(run, boundaries, par.stages)
        fetch_missing_stage_files(run.path, stage_index, start, par.stages)  # torchrun placed it on another node
        state = load_checkpoint(stage_file(run.path, stage_index, start))
        module.load_state_dict(state["model"])
        # stage files from before the optimizer choice were SGD's
        if state_matches(state.get("optimizer", "sgd"), train.optimizer, say=rank == 0):
            optimizer.load_state_dict(state["optim"])
    started = time.perf_counter() - run.start(start)  # the log keeps the steps up to the checkpoint
    guard = DivergenceGuard(train.on_divergence, run.path / CHECKPOINT_FILE, last_good=start if run.resume else None,
                            device=device, rank_name=lambda r: f"rank {r} (stage {layout.coords(r)[1]})",
                            gradient_name="gradient after the replicas' average" if par.replicas > 1 else "gradient")
    final: dict[str, Any] = {}
    done = start
    try:
        for step in range(start, train.steps):
            done = step + 1
            idx = batches.indices(step)[replica * per_replica:(replica + 1) * per_replica]
            inputs = data.prepare(train_x[idx]).to(device) if placement.is_first else None
            targets = train_y[idx].to(device) if placement.is_last else None
            optimizer.zero_grad(set_to_none=True)
            record = stage.train_step(schedule, per_replica, inputs, targets)
            groups.allreduce_grads(module).wait()  # replicas of this stage agree before anyone steps
            # every rank's loss (last stage), gradients and parameters checked together: all step, skip or stop
            if guard.before_update(done, loss=record.loss, grads=[p.grad for p in module.parameters()],
                                   params=list(module.parameters())):
                optimizer.step()
            elif run.writes:
                run.write({"step": done, "diverged": guard.skipped[done], "skipped": True})
            if (done % train.log_every == 0 or done == train.steps) and done not in guard.skipped:
                final = _log_step(run, record, groups, placement, config, world_size, optimizer, started, done)
            if replica == 0 and data.has_test and \
                    ((train.eval_every and done % train.eval_every == 0) or done == train.steps):  # 0: at the end
                test = _evaluate(stage, data, config, device, loss_fn)
                if run.writes:
                    final = {**final, **test}
                    run.write({"step": done, **test, "lr": current_lr(optimizer),
                               "elapsed_s": time.perf_counter() - started, "time": time.time()})
            if run.due(done, final=done == train.steps):
                guard.before_checkpoint(done, list(module.parameters()))  # no checkpoint holds a diverged model
                save_stage_checkpoint(run.path, stage_index, done, {"model": module.state_dict(),
                                                                    "optim": optimizer.state_dict(),
                                                                    "optimizer": optimizer_name(optimizer)},
                                      boundaries, par.stages)
                guard.saved(done)
    except Diverged as err:  # every rank stops at the same step; each rank's last good checkpoint stays
        run.write({"step": done, "diverged": str(err)})
        raise
    _save_whole_model(run, config, module, boundaries, replica, stage_index)
    return final if run.writes else None
