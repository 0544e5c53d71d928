"""Communication hooks: how each gradient bucket is synced, as one small interface (as DDP's comm hooks).

A hook is any callable `hook(bucket: GradBucket) -> Handle | torch.Tensor`:
- `bucket.buffer` holds this rank's gradient of the bucket (flat, laid out as `bucket.shapes`); it is a view into
  the trainer's flat gradient, so what the hook leaves there is what the optimizer steps on;
- return a `Handle` whose `wait()` leaves the mean gradient over the ranks in `bucket.buffer` (communication may
  still run when the hook returns, overlapping backward), or return the mean gradient as a tensor (it is copied in);
- communicate through `bucket.allreduce` (the run's all-reduce: native, ring, tree or naive, over the gradient
  group, counting the bytes this rank moves), so every hook is all-reduce compatible and its traffic is counted.

Every rank calls the hook on the same buckets in the same order, and must issue the same collectives in the same
order. Hooks with state (error feedback, PowerSGD's Q) are objects with `__call__`, keyed by `bucket.index`; if
they also have `state_dict()` (this rank's state: tensors, ints, lists and dicts of them) and `load_state_dict()`,
the trainer keeps one per rank in its checkpoints, so a resumed run goes on where it stopped.

Hooks here: `allreduce_hook` (the default sync, plain mean), `CastHook` (fp16 / bf16 on the wire), `PowerSGDHook`
(powersgd.py) and `SharedTopKHook` (topk_hook.py). `make_comm_hook(name)` builds one by name, or imports a user's
("package.module:attribute": a hook, or a class whose instance is the hook).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.parallel.collectives import AllReduce, Handle

HOOK_NAMES = ("none", "allreduce", "fp16", "bf16", "powersgd", "topk")


@dataclass(frozen=True, slots=True)
class GradBucket:
    index: int                       # the bucket's place in sync order (0: the last layers, synced first)
    buffer: torch.Tensor             # this rank's flat gradient of the bucket, a view into the trainer's flat grad
    shapes: tuple[torch.Size, ...]   # the bucket's parameters' shapes, in buffer order
    allreduce: AllReduce             # sum over the gradient group; `.world_size`, `.rank`, `.stats`

    def views(self) -> list[torch.Tensor]:
        """The bucket's gradients one per parameter, shaped as the parameters (views into `buffer`)."""
        out, offset = [], 0
        for shape in self.shapes:
            numel = shape.numel()
            out.append(self.buffer[offset:offset + numel].view(shape))
            offset += numel
        return out


CommHook = Callable[[GradBucket], Handle | torch.Tensor]


def allreduce_hook(bucket: GradBucket) -> Handle:
    """The uncompressed mean: sum with the run's all-reduce, then divide by the number of ranks."""
    n = bucket.allreduce.world_size
    return bucket.allreduce.all_reduce_async(bucket.buffer, then=lambda: bucket.buffer.div_(n))


class CastHook:
    """Send the gradient in a 16-bit float (half the bytes of fp32), summed on the wire like the plain all-reduce.
    Each rank divides by n before casting: the sum of n fp16 gradients could overflow where their mean does not.
    bf16 keeps fp32's range with 8 bits of mantissa; fp16 has 11 bits but a narrow range."""

    def __init__(self, dtype: torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"comm_hook: a cast hook sends float16 or bfloat16, not {dtype}")
        self.dtype = dtype

    def __call__(self, bucket: GradBucket) -> Handle:
        low = bucket.buffer.div(bucket.allreduce.world_size).to(self.dtype)
        return bucket.allreduce.all_reduce_async(low, then=lambda: bucket.buffer.copy_(low))


def _import_hook(path: str) -> CommHook:
    module_name, _, attribute = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"comm_hook.name = {path!r}: cannot import it ({err})") from err
    hook = target() if isinstance(target, type) else target
    if not callable(hook):
        raise ValueError(f"comm_hook.name = {path!r} is not callable")
    return hook


def check_hook_name(name: str) -> None:
    if name not in HOOK_NAMES and ":" not in name:
        raise ValueError(f"comm_hook.name = {name!r} is unknown; choose one of {list(HOOK_NAMES)} or give your own "
                         "as 'package.module:attribute'")


def make_comm_hook(name: str, *, rank: int = 4, start_step: int = 10, ratio: float = 0.01,
                   error_feedback: bool = True, seed: int = 0) -> CommHook | None:
    """The hook called `name` (None for "none": the trainer's own sync). `rank` and `start_step` are PowerSGD's,
    `ratio` top-k's; `seed` draws PowerSGD's first Q (the same on every rank)."""
    if name == "none":
        return None
    if name == "allreduce":
        return allreduce_hook
    if name in ("fp16", "bf16"):
        return CastHook(torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "powersgd":
        from plait.parallel.powersgd import PowerSGDHook
        return PowerSGDHook(rank=rank, start_step=start_step, error_feedback=error_feedback, seed=seed)
    if name == "topk":
        from plait.parallel.topk_hook import SharedTopKHook
        return SharedTopKHook(ratio=ratio, error_feedback=error_feedback)
    if ":" not in name:
        check_hook_name(name)  # neither one of ours nor the user's: says which names there are
    return _import_hook(name)
