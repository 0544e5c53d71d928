"""Bucketed gradient sync that overlaps backward, as DDP's reducer does.

Gradients live in one flat buffer laid out in reverse parameter order (the order backward produces them); each
parameter's `.grad` is a view into it, so autograd accumulates straight into the buffer and no copy is made.
Contiguous runs of about `bucket_bytes` form buckets. A post-accumulate-grad hook counts each bucket's pending
parameters; when a bucket is complete its sync starts at once (async handle) while backward goes on with earlier
layers. Buckets start in index order on every rank (a bucket ready early waits for its predecessors), because
ranks must issue collectives in the same order. `finish()` waits for all handles, before the optimizer step.

Sync per bucket, chosen by `op`:
- "allreduce": sum by the chosen algorithm, then divide by the world size (mean gradient);
- "reduce": sum onto rank 0 only (`dist.reduce`), for the parameter-server-on-one-device policy;
- "compressed": encode (plus error feedback), all-gather every rank's payload with the backend's all-gather,
  decode each and average them in rank order. Compressed gradients are all-gathered, not reduced: top-k payloads of
  different ranks carry different indices and cannot be summed on the wire (so the bytes grow with the ranks);
- "hook": a communication hook (comm_hooks.py) syncs the bucket through the run's all-reduce: fp16/bf16, PowerSGD,
  top-k on shared indices, or the user's own.

Two ways to drive a step. Plait's trainer (`DataParallel`) calls `reset()` (zero, re-arm) before its backward and
`finish()` after it. Around a user's own module and loop (`wrap`), `finish_after_backward=True` queues `finish()` on
autograd's engine when backward reaches the first gradient, so `loss.backward()` returns with the gradients synced
as under DDP, and `arm()` (called from the module's forward) re-arms the buckets without zeroing what the user's
loop keeps in the gradients.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from plait.parallel.collectives import AllReduce, CommStats, Handle
from plait.parallel.comm_hooks import CommHook, GradBucket


@dataclass(slots=True)
class Bucket:
    index: int
    start: int      # element offsets inside the flat gradient buffer
    stop: int
    num_params: int
    shapes: tuple[torch.Size, ...]  # its parameters' shapes, in buffer order
    pending: int = 0
    ready: bool = False
    handle: Handle | None = None


class SyncSwitch:
    """`no_sync()`, as DDP has it: gradient hooks see `_enabled` False inside and leave the gradients local."""

    _enabled = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients locally and starts no communication (gradient accumulation)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True


class GradSync(SyncSwitch):
    def __init__(self, params: list[torch.nn.Parameter], allreduce: AllReduce, *, bucket_bytes: int,
                 op: Literal["allreduce", "reduce", "compressed", "hook"] = "allreduce", overlap: bool = True,
                 compressor=None, comm_hook: CommHook | None = None, finish_after_backward: bool = False):
        if bucket_bytes < 1:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_bytes} bytes")
        if op == "compressed" and compressor is None:
            raise ValueError("compressed sync needs a compressor")
        if (op == "hook") != (comm_hook is not None):
            raise ValueError("a communication hook goes with op = 'hook', and op = 'hook' needs one")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"gradient buckets need parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.params = params
        self.allreduce, self.op, self.overlap, self.compressor = allreduce, op, overlap, compressor
        self.comm_hook = comm_hook
        self.finish_after_backward = finish_after_backward
        self.group, self.world_size = allreduce.group, allreduce.world_size
        # hooks communicate through the all-reduce, which counts their bytes
        self.stats = allreduce.stats if op in ("allreduce", "hook") else CommStats()
        ordered = list(reversed(params))  # backward meets the last layer first
        total = sum(p.numel() for p in ordered)
        self.flat_grad = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[torch.nn.Parameter, int] = {}
        self._offset_of: dict[torch.nn.Parameter, int] = {}
        offset, start, count, shapes = 0, 0, 0, []
        itemsize = self.flat_grad.element_size()
        for p in ordered:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            self._bucket_of[p] = len(self.buckets)
            self._offset_of[p] = offset
            offset += p.numel()
            count += 1
            shapes.append(p.shape)
            if (offset - start) * itemsize >= bucket_bytes or p is ordered[-1]:
                self.buckets.append(Bucket(len(self.buckets), start, offset, count, tuple(shapes)))
                start, count, shapes = offset, 0, []
        self._views = {p: (p.grad.data_ptr()) for p in params}
        self._next = 0          # index of the next bucket to launch
        self._enabled = True
        self._finish_queued = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self.reset()

    # ---- per step -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the gradients and re-arm the buckets (call before the first backward of a step)."""
        self.flat_grad.zero_()
        self._rearm()

    def arm(self) -> None:
        """Re-arm the buckets for the next backward, keeping what the gradients hold (a user's loop zeroes them, or
        accumulates on purpose); a parameter whose `.grad` is None (after `zero_grad()`) gets its view back, zeroed."""
        for p in self.params:
            if p.grad is None:
                view = self._view(p)
                view.zero_()
                p.grad = view.view_as(p)
        self._rearm()

    def _rearm(self) -> None:
        for bucket in self.buckets:
            bucket.pending, bucket.ready, bucket.handle = bucket.num_params, False, None
        self._next = 0
        self._finish_queued = False

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if param.grad.data_ptr() != self._views[param]:
            # autograd replaced .grad instead of accumulating into the view: copy it home (never expected on CPU).
            view = self._view(param)
            view.copy_(param.grad)
            param.grad = view.view_as(param)
        if not self._enabled:
            return
        bucket = self.buckets[self._bucket_of[param]]
        if bucket.handle is not None:  # its sync was started: this is a second backward since the re-arm
            raise RuntimeError("a second backward reached gradients that were already synced: run the forward again "
                               "before each backward, or accumulate micro-batches under no_sync()")
        if self.finish_after_backward and not self._finish_queued:
            # runs once this backward is done: launch what is left (unused parameters) and wait for every bucket
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self._finish_queued = True
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.ready = True
            if self.overlap:
                self._launch_ready()

    def _view(self, param: torch.nn.Parameter) -> torch.Tensor:
        offset = self._offset_of[param]
        return self.flat_grad[offset : offset + param.numel()]

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].ready:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        flat = self.flat_grad[bucket.start : bucket.stop]
        if self.op == "allreduce":
            bucket.handle = self.allreduce.all_reduce_async(flat, then=lambda: flat.div_(self.world_size))
        elif self.op == "reduce":
            bucket.handle = self._reduce(flat)
        elif self.op == "hook":
            bucket.handle = self._hook(bucket, flat)
        else:
            bucket.handle = self._compressed(bucket, flat)

    def finish(self) -> None:
        """Launch what backward did not (unused parameters, or overlap off), then wait for every bucket."""
        for bucket in self.buckets:
            bucket.ready = True
        self._launch_ready()
        for bucket in self.buckets:
            bucket.handle.wait()

    def wait_seconds(self) -> float:
        return self.stats.seconds

    # ---- the non-all-reduce ops -------------------------------------------------------------------------------------
    def _reduce(self, flat: torch.Tensor) -> Handle:
        if self.world_size == 1:
            return Handle(lambda: None)
        is_root = dist.get_rank(self.group) == 0
        work = dist.reduce(flat, dst=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group,
                           async_op=True)
        self.stats.bytes_sent += flat.numel() * flat.element_size()  # each rank's share travels once (tree or not)
        self.stats.calls += 1

        def finish() -> None:
            start = time.perf_counter()
            work.wait()
            self.stats.seconds += time.perf_counter() - start
            if is_root:
                flat.div_(self.world_size)  # the server steps on the mean gradient

        return Handle(finish)

    def _hook(self, bucket: Bucket, flat: torch.Tensor) -> Handle:
        result = self.comm_hook(GradBucket(bucket.index, flat, bucket.shapes, self.allreduce))
        if isinstance(result, torch.Tensor):  # the hook returned the mean itself
            if result.data_ptr() != flat.data_ptr():
                flat.copy_(result)
            return Handle(lambda: None)
        if not hasattr(result, "wait"):
            raise TypeError(f"comm hook {self.comm_hook!r} returned {type(result).__name__}: a hook returns a handle "
                            "with wait() or the averaged tensor")

        def finish() -> None:
            value = result.wait()  # a Plait Handle leaves the mean in the buffer; a torch Future may return it
            if isinstance(value, torch.Tensor) and value.data_ptr() != flat.data_ptr():
                flat.copy_(value.view_as(flat))

        return Handle(finish)

    def _compressed(self, bucket: Bucket, flat: torch.Tensor) -> Handle:
        encoded = self.compressor.compress(bucket.index, flat)
        names = sorted(encoded.tensors)
        gathered, works = {}, []
        n = self.world_size
        for name in names:
            mine = encoded.tensors[name].contiguous()
            gathered[name] = [torch.empty_like(mine) for _ in range(n)]
            if n > 1:
                works.append(dist.all_gather(gathered[name], mine, group=self.group, async_op=True))
            else:
                gathered[name][0].copy_(mine)
        # an all-gather moves (n−1) payloads into and out of each rank, whatever the backend's algorithm
        self.stats.bytes_sent += (n - 1) * encoded.nbytes
        self.stats.bytes_recv += (n - 1) * encoded.nbytes
        self.stats.calls += 1

        def finish() -> None:
            start = time.perf_counter()
            for work in works:
                work.wait()
            self.stats.seconds += time.perf_counter() - start
            total = None
            for r in range(n):  # rank order: every rank computes the same bits
                part = self.compressor.decode(encoded, {name: gathered[name][r] for name in names})
                total = part.clone() if total is None else total.add_(part)
            flat.copy_(total.view(-1)).div_(n)

        return Handle(finish)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
