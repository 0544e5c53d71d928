"""Data × pipeline: r replicas of a p-stage pipeline on r·p ranks.

Rank = replica · p + stage, so a pipeline's stages are consecutive ranks (neighbours on one node under torchrun)
and the replicas of one stage are p ranks apart. Each stage's replicas form a process group (`new_group`) in which
their gradients are averaged with the backend's native all-reduce after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.pipeline.stage import Placement


@dataclass(frozen=True, slots=True)
class PipelineLayout:
    replicas: int
    stages: int

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"parallel.stages must be >= 1, got {self.stages}")
        if self.replicas < 1:
            raise ValueError(f"parallel.replicas must be >= 1, got {self.replicas}")

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"parallel.replicas × parallel.stages = {self.replicas} × {self.stages} = "
                             f"{self.world_size} ranks, but {world_size} were started (--nproc)")

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of a global rank."""
        return divmod(rank, self.stages)

    def rank_of(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(r, stage) for r in range(self.replicas)]

    def placement(self, rank: int) -> Placement:
        replica, stage = self.coords(rank)
        # the other end of this replica's pipeline: interleaved schedules wrap from its last stage to its first
        wrap = self.rank_of(replica, self.stages - 1 - stage) if stage in (0, self.stages - 1) else None
        return Placement(stage=stage, num_stages=self.stages,
                         prev_rank=self.rank_of(replica, stage - 1) if stage > 0 else None,
                         next_rank=self.rank_of(replica, stage + 1) if stage < self.stages - 1 else None,
                         wrap_rank=wrap)


class GradAllReduce:
    """Handle of an in-flight gradient all-reduce; `wait()` averages and writes the gradients back."""

    def __init__(self, work, flat: torch.Tensor | None, grads: list[torch.Tensor], replicas: int):
        self._work, self._flat, self._grads, self._replicas = work, flat, grads, replicas

    def wait(self) -> None:
        if self._flat is None:
            return
        if self._work is not None:
            self._work.wait()
        self._flat.div_(self._replicas)
        offset = 0
        for grad in self._grads:
            grad.copy_(self._flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


class ReplicaGroups:
    """The process groups of a layout. Every rank must build it, in the same order (new_group is collective)."""

    def __init__(self, layout: PipelineLayout, rank: int):
        self.layout = layout
        self.replica, self.stage = layout.coords(rank)
        self.stage_group = None
        if layout.replicas > 1:
            for stage in range(layout.stages):
                group = dist.new_group(layout.stage_ranks(stage))
                if stage == self.stage:
                    self.stage_group = group

    def allreduce_grads(self, module: nn.Module) -> GradAllReduce:
        """Start averaging this stage's gradients over its replicas: one flat buffer, one all-reduce."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if self.stage_group is None or not grads:  # one replica: nothing to average
            return GradAllReduce(None, None, [], 1)
        flat = torch.cat([g.reshape(-1) for g in grads])  # on the gradients' device
        work = dist.all_reduce(flat, group=self.stage_group, async_op=True)
        return GradAllReduce(work, flat, grads, self.layout.replicas)

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        if self.stage_group is None:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, group=self.stage_group)
        return value / self.layout.replicas
