"""The world layout, validated once, and the process groups built from it.

`ParallelDims` (named after torchtitan's) checks that the degrees multiply to the world size before any group is
made, then builds the groups every rank needs, in the same order on every rank (`dist.new_group` is collective):

- `dp_group`: the ranks that hold replicas of the same stage and average their gradients (data parallel);
- `pp_group`: the ranks that hold consecutive stages of one replica (pipeline), when pp > 1;
- `grad_group`: a second handle on this rank's data-parallel ranks, used only for gradient and parameter sync, so
  that sync traffic (possibly on a worker thread) never interleaves with control messages (loss, metrics) on
  `dp_group`.

Rank layout: rank = dp_index · pp + pp_index (a replica's stages are neighbours, as on one node).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(kw_only=True, slots=True)
class ParallelDims:
    world_size: int
    dp: int = -1  # -1: whatever the world size leaves once pp is set
    pp: int = 1
    dp_group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)
    grad_group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.pp < 1:
            raise ValueError(f"parallel.pp must be >= 1, got {self.pp}")
        if self.dp == -1:
            if self.world_size % self.pp:
                raise ValueError(f"world size {self.world_size} is not a multiple of parallel.pp = {self.pp}")
            self.dp = self.world_size // self.pp
        if self.dp < 1 or self.dp * self.pp != self.world_size:
            raise ValueError(f"parallel.dp × parallel.pp = {self.dp} × {self.pp} must equal the world size "
                             f"{self.world_size}")

    def dp_ranks(self, rank: int) -> list[int]:
        return [d * self.pp + rank % self.pp for d in range(self.dp)]

    def pp_ranks(self, rank: int) -> list[int]:
        return [rank // self.pp * self.pp + s for s in range(self.pp)]

    def build(self) -> ParallelDims:
        """Create the groups (collective: every rank calls it, after init_process_group)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed initialised (spawn_ranks or torchrun)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, the layout wants {self.world_size}")
        rank = dist.get_rank()
        if self.pp == 1:
            self.dp_group = None  # the default group is the data-parallel group
        else:
            for s in range(self.pp):  # every rank creates every group, in the same order
                group = dist.new_group([d * self.pp + s for d in range(self.dp)])
                if rank % self.pp == s:
                    self.dp_group = group
            for d in range(self.dp):
                group = dist.new_group([d * self.pp + s for s in range(self.pp)])
                if rank // self.pp == d:
                    self.pp_group = group
        for s in range(self.pp):
            group = dist.new_group(self.dp_ranks(s))
            if rank % self.pp == s:
                self.grad_group = group
        return self
