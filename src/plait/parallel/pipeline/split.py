"""`split_pipeline`: pipeline stages cut from your own nn.Sequential, stepped from your own training loop.

    dist.init_process_group("gloo")                  # under torchrun: one rank per stage
    torch.manual_seed(0)                             # every rank builds the same model; each keeps its stage
    pipe = plait.parallel.split_pipeline(my_sequential, stages=2, schedule="1f1b", micro_batches=4,
                                         loss_fn=F.cross_entropy)
    # or, for a model larger than one rank's memory: built on the meta device, only this rank's stage materialised
    pipe = plait.parallel.split_pipeline(make_my_sequential, build="meta", seed=0, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)  # this rank's stage
    for x, y in batches:                             # the same batches on every rank
        opt.zero_grad()
        loss = pipe.step(x, y)                       # the batch-mean loss on the last stage, None on the others
        opt.step()

Rank r holds stage r. `step` runs this rank's row of the schedule (GPipe or 1F1B over `micro_batches`):
activations go forward and gradients back to the neighbouring ranks, and each stage's gradients accumulate over the
micro-batches into the batch-mean loss's gradient, as one process training the whole model on the whole batch would
have them. The stages are `pipeline/stage.py`'s, the schedules `schedule.py`'s (dry-run before the first message),
the split `partition.py`'s: at explicit `boundaries`, or balanced by parameter count over `stages`.
Replicated pipelines (data × pipeline) are the config trainer's (`plait train`, `parallel.replicas`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.device import rank_device
from plait.parallel.pipeline.inference import pipelined_forward
from plait.parallel.pipeline.meta_init import build_on_meta, check_initialisable, materialise, stage_layer_indices
from plait.parallel.pipeline.partition import as_layers, balance_by_params, split_layers
from plait.parallel.pipeline.schedule import SCHEDULES, Schedule, build_schedule, dry_run
from plait.parallel.pipeline.stage import PipelineStage, Placement

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PipelineParallel:
    """This rank's stage of a pipeline and the schedule every rank runs."""

    def __init__(self, stage: PipelineStage, schedule: Schedule, boundaries: list[int]):
        self.stage, self.schedule, self.boundaries = stage, schedule, boundaries

    @property
    def module(self) -> nn.Module:
        """This rank's layers (an nn.Sequential sharing the user model's layers)."""
        return self.stage.module

    @property
    def is_first(self) -> bool:
        return self.stage.placement.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.placement.is_last

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters: give them to the optimizer."""
        return self.module.parameters()

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *,
             batch_size: int | None = None) -> torch.Tensor | None:
        """Forward and backward of one batch through the pipeline (collective: every rank calls it). The first
        stage reads `inputs`, the last `targets`; the others need only the batch size (from either, or
        `batch_size`). Returns the batch-mean loss (detached) on the last stage, None on the others."""
        size = _batch_size(inputs, targets, batch_size)
        device = self.stage.device
        record = self.stage.train_step(self.schedule, size,
                                       inputs.to(device) if self.is_first and inputs is not None else None,
                                       targets.to(device) if self.is_last and targets is not None else None)
        return record.loss

    def predict(self, inputs: torch.Tensor | None, *, batch_size: int | None = None) -> torch.Tensor | None:
        """Forward only (eval mode, no gradients): the outputs on the last stage, None on the others."""
        size = _batch_size(inputs, None, batch_size)
        x = inputs.to(self.stage.device) if self.is_first and inputs is not None else None
        return pipelined_forward(self.stage, size, min(self.schedule.num_micro_batches, size), x)


def _batch_size(inputs: torch.Tensor | None, targets: torch.Tensor | None, batch_size: int | None) -> int:
    for tensor in (inputs, targets):
        if tensor is not None:
            return len(tensor)
    if batch_size is None:
        raise ValueError("a pipeline step needs the batch size on every stage: pass the batch, or batch_size=")
    return batch_size


def _built(model: nn.Sequential | Sequence[nn.Module] | Callable[[], nn.Module],
           build: str) -> nn.Module | Sequence[nn.Module]:
    """The model to cut: as given ("full"), or built on the meta device from a function, or checked to be there."""
    if build not in ("full", "meta"):
        raise ValueError(f"split_pipeline(build={build!r}) is unknown; choose 'full' or 'meta'")
    if isinstance(model, (nn.Module, Sequence)):
        built: nn.Module | Sequence[nn.Module] = model
    elif build == "full":
        raise ValueError("split_pipeline(build='full') takes the model itself; a function returning it goes with "
                         "build='meta'")
    else:
        built = build_on_meta(model)
    if build == "full":
        return built
    layers = as_layers(built)
    real = [i for i, layer in enumerate(layers) if any(not t.is_meta for t in [*layer.parameters(), *layer.buffers()])]
    if real:
        raise ValueError(f"split_pipeline(build='meta') needs the model on the meta device (pass the function that "
                         f"builds it, or build it under `with torch.device('meta')`); layers {real} have real "
                         "tensors")
    for index, layer in enumerate(layers):
        check_initialisable(layer, index, "split_pipeline(build='meta')")
    return layers


def _boundaries(layers: list[nn.Module], stages: int | None, boundaries: Sequence[int] | None,
                world_size: int) -> list[int]:
    """The index of the first layer of stages 1..p-1, checked against the layers and the ranks."""
    if boundaries is not None:
        bounds = [int(b) for b in boundaries]
        if stages is not None and stages != len(bounds) + 1:
            raise ValueError(f"split_pipeline(stages={stages}) and boundaries={bounds} ({len(bounds) + 1} stages) "
                             "disagree: give one of them")
        if any(not a < b for a, b in zip([0, *bounds], [*bounds, len(layers)])):
            raise ValueError(f"split_pipeline(boundaries={bounds}) must increase strictly inside (0, {len(layers)}): "
                             "every stage needs at least one layer")
        stages = len(bounds) + 1
    stages = world_size if stages is None else stages
    if stages != world_size:
        raise ValueError(f"split_pipeline(stages={stages}) needs {stages} ranks (one per stage); this group has "
                         f"{world_size}")
    if not 1 <= stages <= len(layers):
        raise ValueError(f"split_pipeline(stages={stages}) must be between 1 and the number of layers ({len(layers)})")
    return bounds if boundaries is not None else balance_by_params(layers, stages)


def split_pipeline(model: nn.Sequential | Sequence[nn.Module] | Callable[[], nn.Module], *, loss_fn: LossFn,
                   stages: int | None = None, boundaries: Sequence[int] | None = None, schedule: str = "1f1b",
                   micro_batches: int = 4, recompute: bool = False, device: torch.device | None = None,
                   build: str = "full", seed: int | None = None) -> PipelineParallel:
    """Keep this rank's stage of `model` (call on every rank, after `dist.init_process_group`, with the same model).

    `stages` (default: one per rank) balances the layers by parameter count; `boundaries` gives the split points
    instead (the index of the first layer of stages 1..p-1). `schedule`: "gpipe" or "1f1b". `micro_batches`: each
    step's batch is cut into this many. `recompute`: keep only each stage's inputs and redo the forward in backward.
    `device`: where this rank's stage runs (default: cuda:LOCAL_RANK under NCCL, else the CPU).
    `build = "meta"`: `model` is a function returning the model (built here under `torch.device("meta")`) or a model
    already built on the meta device; only this rank's layers are materialised, each by its `reset_parameters()`
    under a generator seeded from (`seed`, default 0, and its index): `pipeline.meta_init.materialise(model,
    seed=seed)` gives the same weights in one process."""
    if schedule not in SCHEDULES:
        raise ValueError(f"split_pipeline(schedule={schedule!r}) is unknown; choose one of {sorted(SCHEDULES)}")
    if micro_batches < 1:
        raise ValueError(f"split_pipeline(micro_batches={micro_batches}) must be >= 1")
    if not dist.is_initialized():
        raise RuntimeError("plait.parallel.split_pipeline needs torch.distributed initialised: call "
                           "dist.init_process_group() first (under torchrun, or in ranks of spawn_ranks)")
    layers = as_layers(_built(model, build))
    world_size, rank = dist.get_world_size(), dist.get_rank()
    bounds = _boundaries(layers, stages, boundaries, world_size)
    device = device if device is not None else rank_device()
    if build == "full" and seed is not None:
        warnings.warn(f"split_pipeline(seed={seed}) is ignored with build='full': the model comes with its weights",
                      stacklevel=2)
    if build == "meta":
        materialise(layers, seed=seed or 0, device=device,
                    indices=stage_layer_indices(bounds, len(layers), rank, world_size))
    module = split_layers(layers, bounds)[rank].to(device)
    placement = Placement(stage=rank, num_stages=world_size, prev_rank=rank - 1 if rank > 0 else None,
                          next_rank=rank + 1 if rank < world_size - 1 else None)
    plan = build_schedule(schedule, world_size, micro_batches)
    dry_run(plan)  # a schedule that would deadlock fails here, before any message is sent
    stage = PipelineStage(module, placement, loss_fn=loss_fn if placement.is_last else None, recompute=recompute,
                          device=device)
    return PipelineParallel(stage, plan, bounds)
