"""Point-to-point transfers between neighbouring stages over torch.distributed (gloo on CPU, NCCL on GPU).

A receiver must know the shape and dtype of what comes. Shapes are agreed once per micro-batch size, before the
first step that uses it: each stage receives its input's shape in a fixed 16-integer header from the previous
stage, infers its output's shape from one forward of zeros (in eval mode, without autograd: no running statistics
change), and sends the header on. A real forward of one micro-batch, once per size, costs far less than the meta
device's first use (1-4 s of lazy registration on this machine). Only raw
tensors cross the wire, never pickles.

Headers, probe inputs and receive buffers are made on the stage's device (NCCL moves device tensors only; gloo's
point-to-point moves CPU tensors, and a gloo stage's device is the CPU).
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch
import torch.distributed as dist
from torch import nn

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
_HEADER = 16


def encode_header(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if len(shape) > _HEADER - 2:
        raise ValueError(f"activation of rank {len(shape)} is too large for the pipeline header")
    # built on the host, copied once: a few integers, once per micro-batch size
    header = [len(shape), _DTYPES.index(dtype), *shape] + [0] * (_HEADER - 2 - len(shape))
    return torch.tensor(header, dtype=torch.int64, device=device)


def empty_header(device: torch.device) -> torch.Tensor:
    return torch.empty(_HEADER, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    ndim, code = int(header[0]), int(header[1])
    return tuple(int(d) for d in header[2:2 + ndim]), _DTYPES[code]


def infer_output(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 autocast=contextlib.nullcontext) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype `module` returns for an input of `shape` (under `autocast`, as the real forward runs)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), autocast():
            out = module(torch.zeros(shape, dtype=dtype, device=device))
    finally:
        module.train(was_training)
    return tuple(out.shape), out.dtype


class SendHandles:
    """Outstanding isends: the tensors stay referenced until `wait()` says the transfer is done."""

    def __init__(self) -> None:
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def isend(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self._pending.append((dist.isend(tensor, dst), tensor))

    def wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


class RecvAhead:
    """Receives for a row of actions, posted ahead per channel (irecv), so each message lands while this stage is
    still computing earlier actions instead of after it asks for it.

    `plan[i]` is (shape, dtype, source rank) of what action i receives, or None when it receives nothing. Each
    source channel keeps up to `depth` receives posted, in action order (messages on a channel are matched in the
    order they were posted, as the dry run assumes); one is topped up as soon as another is taken, before waiting.
    At the start of a step the first `depth` receives of every channel are posted at once, so the first message of a
    channel never waits for a receive to be posted (gloo sends a payload only once its receive is posted). Buffers
    are allocated when posted: `depth` per channel beyond what the schedule holds anyway.
    """

    def __init__(self, plan: list[tuple[tuple[int, ...], torch.dtype, int] | None], depth: int = 2, *,
                 device: torch.device):
        if depth < 1:
            raise ValueError(f"receive depth must be >= 1, got {depth}")
        self._plan = plan
        self._depth = depth
        self._device = device
        self._queues: dict[int, deque[int]] = {}  # source rank -> indices of its actions not yet posted, in order
        for index, spec in enumerate(plan):
            if spec is not None:
                self._queues.setdefault(spec[2], deque()).append(index)
        self._posted: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self._outstanding = dict.fromkeys(self._queues, 0)
        for src in self._queues:
            self._top_up(src)

    def _top_up(self, src: int) -> None:
        queue = self._queues[src]
        while queue and self._outstanding[src] < self._depth:
            index = queue.popleft()
            shape, dtype, _ = self._plan[index]
            buffer = torch.empty(shape, dtype=dtype, device=self._device)
            self._posted[index] = (dist.irecv(buffer, src), buffer)
            self._outstanding[src] += 1

    def get(self, index: int) -> torch.Tensor | None:
        """What action `index` receives, blocking until it has arrived (None when it receives nothing)."""
        spec = self._plan[index]
        if spec is None:
            return None
        work, buffer = self._posted.pop(index)
        src = spec[2]
        self._outstanding[src] -= 1
        self._top_up(src)
        work.wait()
        return buffer
