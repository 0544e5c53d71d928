"""Mixed precision as one setting (`train.precision`): "fp32" (off), "bf16" or "fp16" autocast around the forward
and the loss, and for fp16 on CUDA a gradient scaler (fp16's narrow exponent underflows small gradients; bf16 has
fp32's exponent and needs none). Parameters, gradients, the gradient sync and the optimizer stay in fp32, as with
`torch.autocast` anywhere.

bf16 autocast runs on the CPU too (for testing the path; CPU speed gains depend on the chip's bf16 support). fp16
autocast on the CPU is refused: without a scaler, and slower than fp32 there, it has no use on a CPU.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, section: str = "train") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{section}.precision = {precision!r} is unknown; choose one of {list(PRECISIONS)}")


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for `precision` on `device`'s type ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class MixedPrecision:
    """The autocast context and, for fp16 on CUDA, the grad scaler of one trainer on one device."""

    def __init__(self, precision: str, device: torch.device):
        check_precision(precision)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"train.precision = 'fp16' needs a CUDA device (this rank runs on {device}); "
                             "use 'bf16' on the CPU")
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.precision, self.device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (scaled for fp16, so small gradients survive)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale (skipping the step if a gradient overflowed, as every rank sees the same synced gradients and
        decides the same), step, and adapt the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
