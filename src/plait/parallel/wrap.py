"""`wrap`: data parallelism around your own module, inside your own training loop (as torch's DDP).

    dist.init_process_group("gloo")                 # under torchrun: one process per rank
    model = plait.parallel.wrap(MyNet(), allreduce="ring", bucket_mb=25, compression="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in my_shard_of_the_data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()             # returns with the gradients averaged over the ranks
        opt.step()

The sync is the trainer's own (`GradSync`: buckets filled in backward order, each all-reduced by the chosen algorithm
while backward goes on, optionally compressed or through a communication hook); only who drives it differs. Plait's
trainer (`DataParallel`) owns the whole step (optimizer, accumulation, ZeRO, local SGD); here the loop is yours.

Why autograd hooks and not an explicit `sync()` call after backward: a forgotten call would let the replicas drift
apart without a word, and a sync started only after backward could not overlap it. So, as under DDP, the forward
re-arms the buckets and `loss.backward()` returns once every bucket is averaged. Accumulate micro-batches under
`model.no_sync()` (their backward syncs nothing; the next backward outside it syncs the sum). A second backward
through one forward is an error, never a silent second sync.

At construction every rank takes rank 0's parameters and buffers (replicas start equal). Buffers (BatchNorm's running
statistics) are each rank's own afterwards. Move the module to its device before wrapping it; save
`model.module.state_dict()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from plait.core.compress import Fp16Codec, TopKCodec
from plait.parallel.collectives import ALGORITHMS, AllReduce, make_allreduce
from plait.parallel.comm_hooks import HOOK_NAMES, CommHook, make_comm_hook
from plait.parallel.compression import GradCompressor
from plait.parallel.grad_sync import GradSync

COMPRESSIONS = ("none", "fp16", "topk")
TOPK_RATIO = 0.01  # compression="topk": the share of each bucket's entries sent (with error feedback)


class DataParallelModule(nn.Module):
    """A module whose gradients are averaged over the data-parallel ranks at the end of every backward."""

    def __init__(self, module: nn.Module, grad_sync: GradSync):
        super().__init__()
        self.module = module
        self.grad_sync = grad_sync

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self.grad_sync.arm()  # the backward through this forward syncs every bucket once
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients locally and communicates nothing."""
        with self.grad_sync.no_sync():
            yield

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes this rank has sent and received for gradient sync so far."""
        return self.grad_sync.stats.bytes_sent, self.grad_sync.stats.bytes_recv

    def close(self) -> None:
        """Remove the gradient hooks and stop the all-reduce's worker thread (the module trains alone after)."""
        self.grad_sync.close()
        self.grad_sync.allreduce.close()


def _compressor(compression: str | GradCompressor, seed: int) -> GradCompressor | None:
    if isinstance(compression, GradCompressor):
        return compression
    if compression == "none":
        return None
    codec = TopKCodec(ratio=TOPK_RATIO, seed=seed) if compression == "topk" else Fp16Codec(seed=seed)
    return GradCompressor(codec, error_feedback=True)


def _check_settings(allreduce: str | AllReduce, bucket_mb: float, compression: str | GradCompressor,
                    comm_hook: str | CommHook) -> None:
    """Every setting, before anything is built or sent; an error names the setting."""
    if not isinstance(allreduce, AllReduce) and allreduce not in ALGORITHMS:
        raise ValueError(f"wrap(allreduce={allreduce!r}) is unknown; choose one of {list(ALGORITHMS)}")
    if not bucket_mb > 0:
        raise ValueError(f"wrap(bucket_mb={bucket_mb!r}): the gradient bucket size must be > 0 MiB")
    if not isinstance(compression, GradCompressor) and compression not in COMPRESSIONS:
        raise ValueError(f"wrap(compression={compression!r}) is unknown; choose one of {list(COMPRESSIONS)} or pass "
                         "a GradCompressor")
    if isinstance(comm_hook, str) and comm_hook not in HOOK_NAMES and ":" not in comm_hook:
        raise ValueError(f"wrap(comm_hook={comm_hook!r}) is unknown; choose one of {list(HOOK_NAMES)}, name your own "
                         "as 'package.module:attribute', or pass the hook")
    if comm_hook != "none" and compression != "none":
        raise ValueError(f"wrap(comm_hook={comm_hook!r}) and wrap(compression={compression!r}) both compress the "
                         "gradients: choose one")


def wrap(module: nn.Module, *, allreduce: str | AllReduce = "native", bucket_mb: float = 25.0,
         compression: str | GradCompressor = "none", comm_hook: str | CommHook = "none", overlap: bool = True,
         group: dist.ProcessGroup | None = None, seed: int = 0) -> DataParallelModule:
    """Make `module` data parallel over `group` (default: every rank); call on every rank, after
    `dist.init_process_group`.

    `allreduce`: "native" (the backend's), "ring", "tree" or "naive" (collectives.py), or a built `AllReduce`.
    `bucket_mb`: gradient bucket size; smaller buckets start syncing earlier in backward. `compression`: "none",
    "fp16" or "topk" (1% of each bucket, error feedback), or a built `GradCompressor`. `comm_hook`: a hook name of
    comm_hooks.py ("fp16", "bf16", "powersgd", "topk", "package.module:attribute") or a hook itself. `overlap`: start
    each bucket's sync during backward (False: all after it). `seed` seeds the codecs (each rank's differs by rank).
    """
    _check_settings(allreduce, bucket_mb, compression, comm_hook)
    if not dist.is_initialized():
        raise RuntimeError("plait.parallel.wrap needs torch.distributed initialised: call "
                           "dist.init_process_group() first (under torchrun, or in ranks of spawn_ranks)")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"wrap: {type(module).__name__} has no parameter that requires a gradient")
    root = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():  # replicas start from rank 0's weights and buffers
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=root, group=group)
    built = allreduce if isinstance(allreduce, AllReduce) else make_allreduce(allreduce, group)
    rank = dist.get_rank(group)
    hook = make_comm_hook(comm_hook, seed=seed) if isinstance(comm_hook, str) else comm_hook
    compressor = _compressor(compression, seed * 1000 + rank)
    op: Literal["allreduce", "compressed", "hook"] = \
        "hook" if hook is not None else "compressed" if compressor is not None else "allreduce"
    sync = GradSync(params, built, bucket_bytes=max(1, int(bucket_mb * 2**20)), op=op, overlap=overlap,
                    compressor=compressor, comm_hook=hook, finish_after_backward=True)
    return DataParallelModule(module, sync)
