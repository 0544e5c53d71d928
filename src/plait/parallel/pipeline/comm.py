"""Point-to-point transfers between neighbouring stages over torch.distributed (gloo on CPU, NCCL on GPU).

A receiver must know the shape and dtype of what comes. Shapes are agreed once per micro-batch size, before the
first step that uses it: each stage receives its input's shape in a fixed 16-integer header from the previous
stage, infers its output's shape from one forward of zeros (in eval mode, without autograd: no running statistics
change), and sends the header on. A real forward of one micro-batch, once per size, costs far less than the meta
device's first use (1-4 s of lazy registration on this machine). Only raw
tensors cross the wire, never pickles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
_HEADER = 16


def encode_header(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if len(shape) > _HEADER - 2:
        raise ValueError(f"activation of rank {len(shape)} is too large for the pipeline header")
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0], header[1] = len(shape), _DTYPES.index(dtype)
    header[2:2 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    return header


def decode_header(header: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    ndim, code = int(header[0]), int(header[1])
    return tuple(int(d) for d in header[2:2 + ndim]), _DTYPES[code]


def infer_output(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype `module` returns for an input of `shape`."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(shape, dtype=dtype))
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
    """Receives for a row of actions, each posted one action early (irecv), so the next message travels while
    the current action computes. Receives on each channel are still posted in action order, as the dry run assumes.

    `plan[i]` is (shape, dtype, source rank) of what action i receives, or None when it receives nothing.
    """

    def __init__(self, plan: list[tuple[tuple[int, ...], torch.dtype, int] | None]):
        self._plan = plan
        self._posted: dict[int, tuple[dist.Work, torch.Tensor]] = {}

    def _post(self, index: int) -> None:
        if index < len(self._plan) and self._plan[index] is not None and index not in self._posted:
            shape, dtype, src = self._plan[index]
            buffer = torch.empty(shape, dtype=dtype)
            self._posted[index] = (dist.irecv(buffer, src), buffer)

    def get(self, index: int) -> torch.Tensor | None:
        """What action `index` receives (blocking until it has arrived); posts the receive of the next action."""
        self._post(index)
        self._post(index + 1)
        if index not in self._posted:
            return None
        work, buffer = self._posted.pop(index)
        work.wait()
        return buffer
