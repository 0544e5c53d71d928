"""Sharded sampling: which examples each rank trains on at each step, as a pure function of (seed, step).

Every epoch is one seeded permutation of the training set, the same on every rank. Step t takes the next
world_size · accumulate · batch_size examples of it; rank r gets the r-th contiguous share, split into `accumulate`
micro-batches. Ranks never overlap within an epoch, the combined batch of a step is the concatenation of the ranks'
shares in rank order (what a single process would train on), and resuming at step t needs no sampler state.
The tail of each epoch that does not fill a whole step is dropped.
"""

from __future__ import annotations

import torch


class ShardedSampler:
    def __init__(self, num_examples: int, *, batch_size: int, accumulate: int, rank: int, world_size: int,
                 seed: int):
        self.per_rank = batch_size * accumulate
        self.per_step = self.per_rank * world_size
        if self.per_step > num_examples:
            raise ValueError(f"train.batch_size × train.accumulate × ranks = {self.per_step} exceeds the "
                             f"{num_examples} training examples")
        self.num_examples, self.batch_size, self.accumulate = num_examples, batch_size, accumulate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = num_examples // self.per_step
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=generator)
        return self._perm

    def step_indices(self, step: int) -> torch.Tensor:
        """All ranks' indices for 1-based `step`: [world_size, accumulate, batch_size]."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return perm[k * self.per_step : (k + 1) * self.per_step].view(self.world_size, self.accumulate,
                                                                      self.batch_size)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's micro-batches for `step`: [accumulate, batch_size]."""
        return self.step_indices(step)[self.rank]
