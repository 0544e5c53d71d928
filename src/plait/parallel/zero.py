"""ZeRO-1 (Rajbhandari et al. 2020, stage 1): the optimizer state sharded, parameters and gradients replicated.
Also ZeRO-2's optimizer half: the same slices, stepped on gradients that arrive already sharded.

`sync.shard_optimizer = true` with `sync.kind = "allreduce"`. Gradients are all-reduced as usual (bucketed,
overlapping backward); then each of the n ranks steps only its 1/n of the flat parameters, with an optimizer whose
state covers only that slice (Adam's two moments take 2N/n floats per rank instead of 2N), and the updated slices
are all-gathered into every rank's flat parameters. The optimizers are element-wise, so stepping slices gives the
same numbers as stepping the whole. Per step the all-gather (each slice broadcast by its owner) adds (n−1)/n of the
parameter bytes to the all-reduce's 2(n−1)/n. ZeRO-2 (`sync.shard_gradients`, grad_shard_sync.py) reduce-scatters
the gradients into the slices instead of all-reducing them (`grads_sharded`), and sends no more than plain data
parallel.

The slice is a view into the flat parameter buffer (the optimizer writes into the model directly); its gradient is
gathered from the parameters' gradient views (the flat gradient is laid out in reverse order, so it is no slice of
it). Checkpoints hold the full flat state: gathering it (`full_state`) and loading it are collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.collectives import CommStats
from plait.parallel.optim import flat_state, load_flat_state


class OptimizerShard:
    def __init__(self, flat_param: torch.Tensor, params: list[nn.Parameter], group: dist.ProcessGroup | None,
                 build: Callable[[list[nn.Parameter]], torch.optim.Optimizer], grads_sharded: bool = False):
        self.group, self.grads_sharded = group, grads_sharded  # grads_sharded: ZeRO-2 fills shard.grad itself
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.flat_param, self.numel = flat_param, flat_param.numel()
        # slices as tensor_split cuts them (sizes differ by at most one)
        base, extra = divmod(self.numel, self.world_size)
        starts = [r * base + min(r, extra) for r in range(self.world_size + 1)]
        self.bounds = list(zip(starts[:-1], starts[1:]))
        lo, hi = self.lo, self.hi = self.bounds[self.rank]
        self.shard = nn.Parameter(flat_param[lo:hi])  # aliases the flat buffer: a step updates the model
        self.shard.grad = torch.zeros_like(self.shard)
        self.optimizer = build([self.shard])
        self._pieces = []  # (start in the slice, parameter, start in that parameter, length)
        offset = 0
        for p in params:
            a, b = max(lo, offset), min(hi, offset + p.numel())
            if a < b:
                self._pieces.append((a - lo, p, a - offset, b - a))
            offset += p.numel()
        self.stats = CommStats()

    def step(self, step_fn: Callable[[torch.optim.Optimizer], None]) -> None:
        """Step this rank's slice (`step_fn(optimizer)`), then all-gather every rank's slice into the parameters."""
        grad = self.shard.grad
        if not self.grads_sharded:  # ZeRO-1: copy the slice out of the whole, synced gradients
            for start, p, p_start, length in self._pieces:
                grad[start:start + length].copy_(p.grad.reshape(-1)[p_start:p_start + length])
        step_fn(self.optimizer)
        self._all_gather(self.flat_param)

    def _all_gather(self, flat: torch.Tensor, count: bool = True) -> None:
        """Each slice broadcast from its owner straight into every rank's `flat`: no gather buffer (one of N floats
        would cost what the sharded state saves), slices of unequal size allowed."""
        if self.world_size == 1:
            return
        start = time.perf_counter()
        works = [dist.broadcast(flat[lo:hi], src=self._global(r), group=self.group, async_op=True)
                 for r, (lo, hi) in enumerate(self.bounds) if hi > lo]
        for work in works:
            work.wait()
        if not count:  # a checkpoint's state, not training traffic
            return
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        itemsize = flat.element_size()
        self.stats.bytes_sent += (self.world_size - 1) * (self.hi - self.lo) * itemsize  # as a flat broadcast would
        self.stats.bytes_recv += (self.numel - (self.hi - self.lo)) * itemsize

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every rank's state slices joined, laid out as the flat parameters (collective)."""
        mine = flat_state(self.optimizer, [self.shard])
        full = {}
        for key, value in mine.items():
            if value.dim() == 0:
                full[key] = value  # a step count: the same on every rank
                continue
            gathered = torch.zeros(self.numel, dtype=value.dtype, device=value.device)
            gathered[self.lo:self.hi].copy_(value)
            self._all_gather(gathered, count=False)
            full[key] = gathered
        return full

    def load_full_state(self, flat: dict[str, torch.Tensor]) -> None:
        for key, value in flat.items():
            if value.dim() > 0 and value.numel() != self.numel:
                raise ValueError(f"optimizer state {key!r} holds {value.numel()} values, the parameters "
                                 f"{self.numel}: was the model changed?")
        load_flat_state(self.optimizer, [self.shard],
                        {key: value if value.dim() == 0 else value[self.lo:self.hi] for key, value in flat.items()})
