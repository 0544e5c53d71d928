"""Top-k sparsification made all-reduce compatible: every rank sends the values at the *same* k indices, so the
values can be summed on the wire (bytes per rank 2(n−1)/n · 8k, flat as ranks grow) instead of all-gathering n
different index sets ((n−1) · 8k per rank, growing with the ranks).

Whose top-k? A leader that rotates with each step (ScaleCom's cyclic local top-k, Chen et al. 2020): the leader
picks the k largest entries of its own error-compensated gradient, the indices reach every rank through one small
all-reduce (the others contribute zeros), then every rank's values at those indices are all-reduced. Error feedback
keeps, on every rank, what was not sent (everything outside the indices), so an entry large on some other rank is
sent once its residual grows large on the leader of a later step, or the residuals of ranks look alike (they do
under data parallelism, where ranks see samples of one distribution).
"""

from __future__ import annotations

import math

import torch

from plait.parallel.collectives import Handle
from plait.parallel.comm_hooks import GradBucket


class SharedTopKHook:
    def __init__(self, *, ratio: float = 0.01, error_feedback: bool = True):
        if not 0 < ratio <= 1:
            raise ValueError(f"comm_hook.ratio must be in (0, 1], got {ratio}")
        self.ratio, self.error_feedback = ratio, error_feedback
        self._calls: dict[int, int] = {}
        self._residual: dict[int, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}

    def __call__(self, bucket: GradBucket) -> Handle:
        ar, flat = bucket.allreduce, bucket.buffer
        calls = self._calls[bucket.index] = self._calls.get(bucket.index, 0) + 1
        if bucket.index in self._pending:  # a residual loaded from a checkpoint (a host copy)
            self._residual[bucket.index] = self._pending.pop(bucket.index).to(flat.device)
        leader = calls % ar.world_size  # every rank counts the same calls: they agree on the leader
        if self.error_feedback and bucket.index in self._residual:
            flat.add_(self._residual[bucket.index])
        k = max(1, math.ceil(self.ratio * flat.numel()))
        if ar.rank == leader:
            indices = torch.topk(flat.abs(), k, sorted=False).indices.to(torch.int32)
        else:
            indices = torch.zeros(k, dtype=torch.int32, device=flat.device)
        first = ar.all_reduce_async(indices)  # the leader's indices on every rank (the others add zeros)

        def finish() -> None:
            first.wait()
            chosen = indices.long()
            values = flat[chosen]
            if self.error_feedback:
                residual = self._residual.setdefault(bucket.index, torch.empty_like(flat))
                residual.copy_(flat)
                residual[chosen] = 0  # what was sent leaves the residual
            ar.all_reduce_async(values).wait()
            flat.zero_()
            flat[chosen] = values.div_(ar.world_size)

        return Handle(finish)

    # ---- checkpoint -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's residuals (they differ between ranks) and the call counts (they pick the leader)."""
        return {"calls": dict(self._calls), "residual": {i: r.cpu() for i, r in self._residual.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._calls = {int(i): int(c) for i, c in state["calls"].items()}
        self._pending = {int(i): r for i, r in state["residual"].items()}  # moved to the gradient's device on use
        self._residual = {}
