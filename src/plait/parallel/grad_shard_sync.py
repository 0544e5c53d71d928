"""ZeRO-2's gradient sync (`sync.shard_gradients = true`): each rank keeps only its slice of the mean gradient.

The parameters are cut into the n slices of ZeRO-1 (zero.py: contiguous ranges of the flat parameters). Backward
leaves each parameter's gradient in its own `.grad` (autograd's tensors, no flat buffer). Contiguous runs of about
`bucket_bytes` in backward order form buckets; when a bucket's last gradient has arrived, its gradients are copied
into one bucket buffer and dropped (`.grad = None`), the buffer is reduce-scattered with the ring's reduce-scatter
phase (collectives.py; gloo has no reduce_scatter_tensor), and this rank copies its piece, divided by n, into the
gradient of its slice. So between steps a rank holds 1/n of the gradient; during backward, the gradients of the
buckets not yet synced and one bucket buffer. Each rank sends (n−1)/n of the gradient bytes, half an all-reduce,
and the all-gather after the step sends the other half: the bytes of plain data parallel.

The reduce-scatter runs on the ring's worker thread, overlapping the rest of backward (`overlap`; off: every bucket
starts after backward); buckets start in index order on every rank, because ranks must issue collectives in the
same order, and `finish()` waits for them all before the optimizer step. Under `no_sync()` (accumulation) nothing
is synced and autograd keeps accumulating into `.grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.parallel.collectives import Handle, RingAllReduce
from plait.parallel.grad_sync import SyncSwitch
from plait.parallel.zero import OptimizerShard


@dataclass(slots=True)
class ShardBucket:
    start: int                  # element offsets inside the flat parameters (forward order)
    stop: int
    params: list[nn.Parameter]
    pending: int = 0
    handle: Handle | None = None


class GradShardSync(SyncSwitch):
    op = "reduce_scatter"
    comm_hook = None  # no hook, no compression: the reduce-scatter is the sync

    def __init__(self, params: list[nn.Parameter], shard: OptimizerShard, *, bucket_bytes: int,
                 overlap: bool = True):
        if bucket_bytes < 1:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_bytes} bytes")
        self.params, self.shard, self.overlap = params, shard, overlap
        self.world_size, self.rank = shard.world_size, shard.rank
        self.ring = RingAllReduce(shard.group)
        self.stats = self.ring.stats
        assert shard.shard.grad is not None and shard.grads_sharded  # OptimizerShard made it; it will not copy into it
        self.grad = shard.shard.grad  # this rank's slice of the mean gradient: the only gradient kept between steps
        offsets, offset = {}, 0
        for p in params:
            offsets[p] = offset
            offset += p.numel()
        self.buckets: list[ShardBucket] = []
        self._bucket_of: dict[nn.Parameter, ShardBucket] = {}
        itemsize, run = params[0].element_size(), []
        for p in reversed(params):  # backward meets the last layer first
            run.append(p)
            start, stop = offsets[p], offsets[run[0]] + run[0].numel()
            if (stop - start) * itemsize >= bucket_bytes or p is params[0]:
                bucket = ShardBucket(start, stop, run)
                self.buckets.append(bucket)
                self._bucket_of.update({q: bucket for q in run})
                run = []
        self._offset_of = offsets
        self._next = 0
        self._enabled = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self.reset()

    def reset(self) -> None:
        """Zero this rank's gradient slice, drop any whole gradients and re-arm the buckets (before a step)."""
        self.grad.zero_()
        for p in self.params:
            p.grad = None
        for bucket in self.buckets:
            bucket.pending, bucket.handle = len(bucket.params), None
        self._next = 0

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._enabled:
            return
        bucket = self._bucket_of[param]
        if bucket.handle is not None:
            raise RuntimeError("a second backward reached gradients that were already reduce-scattered: run the "
                               "forward again before each backward, or accumulate micro-batches under no_sync()")
        bucket.pending -= 1
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self, all_of_them: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.pending > 0 and not all_of_them:
                return
            bucket.handle = self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: ShardBucket) -> Handle:
        buffer = torch.zeros(bucket.stop - bucket.start, dtype=self.grad.dtype, device=self.grad.device)
        for p in bucket.params:
            if p.grad is not None:  # None: unused in this step's forward, a zero gradient
                offset = self._offset_of[p] - bucket.start
                buffer[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None  # the whole gradient is freed here: only the slice is kept
        pieces = []
        for lo, hi in self.shard.bounds:  # each rank's piece: the bucket's overlap with its slice (maybe empty)
            a, b = max(lo, bucket.start), min(hi, bucket.stop)
            pieces.append(buffer[a - bucket.start : max(a, b) - bucket.start])
        lo, hi = self.shard.bounds[self.rank]
        a, b = max(lo, bucket.start), min(hi, bucket.stop)
        mine = self.grad[a - lo : max(a, b) - lo]

        def keep_mine() -> None:  # on the worker thread; buckets write disjoint ranges of the slice
            mine.copy_(pieces[self.rank]).div_(self.world_size)  # divided after the sum, as plain data parallel

        return self.ring.reduce_scatter_async(pieces, then=keep_mine)

    def finish(self) -> None:
        """Start the buckets backward did not complete (parameters it did not reach), then wait for every bucket."""
        self._launch_ready(all_of_them=True)
        for bucket in self.buckets:
            assert bucket.handle is not None
            bucket.handle.wait()

    def wait_seconds(self) -> float:
        return self.stats.seconds

    def grad_bytes(self) -> int:
        """Bytes of gradient this rank holds now (after a step: its slice only)."""
        whole = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        return whole + self.grad.numel() * self.grad.element_size()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.ring.close()

