"""What the server checks of an update's header and bytes beyond the wire format: that it is encoded with the
run's codec, and that a compressed one decodes to a finite float32 delta of the model's size."""

from __future__ import annotations

from typing import Any

import torch

from plait.core.compress import Encoded
from plait.federated.client_program import ClientProgram
from plait.federated.net.wire import TensorAssembler, WireError, split_parts


def is_compressed(h: Any, codec: str, what: str) -> bool:
    """True for a compressed update (codec and parts instead of one float32 tensor), of the run's codec."""
    if not h.codec and not h.parts:
        if codec != "none":
            raise WireError("malformed", f"{what}: an uncompressed update; fl.compression.codec is {codec!r}")
        return False
    if h.codec != codec or h.HasField("tensor"):
        raise WireError("malformed", f"{what}: compressed with {h.codec!r}; fl.compression.codec is {codec!r}")
    return True


def decompress(program: ClientProgram, cid: int, h: Any, assembler: TensorAssembler, numel: int,
               what: str) -> torch.Tensor:
    if assembler.received != len(assembler.buffer):
        raise WireError("malformed", f"{what}: stream ended after {assembler.received} of "
                                     f"{len(assembler.buffer)} bytes")
    tensors = split_parts(assembler.buffer, h.parts, what)
    enc = Encoded(h.codec, (numel,), torch.float32, tensors, len(assembler.buffer))
    try:
        delta = program.decode(cid, enc)
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError) as err:
        raise WireError("malformed", f"{what}: {err} (stage decompress)") from err
    if delta.shape != (numel,) or delta.dtype != torch.float32:
        raise WireError("shape", f"{what}: decompresses to {delta.dtype} {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise WireError("nonfinite", f"{what}: decompresses to NaN/Inf values")
    return delta
