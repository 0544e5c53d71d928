"""What the server checks of what a client claims beyond the wire format: its declared number of examples at
registration, that an update is encoded with the run's codec and claims no more examples than were declared, and
that a compressed one decodes to a finite float32 delta of the model's size."""

from __future__ import annotations

import math
from typing import Any

import torch

from plait.core.compress import Encoded
from plait.core.finite import all_finite
from plait.federated.client_program import ClientProgram
from plait.federated.net.wire import TensorAssembler, WireError, split_parts


def check_registration(request: Any, config: Any, cid: int, numel: int, pipeline: str) -> None:
    """A registering client's declared examples: within fl.bounds.max_examples, and within what a secure-aggregation
    ring can hold as a weight; the model and the update stages it says it trains: the server's (`numel` parameters,
    `pipeline` the server's fingerprint), so a client started with another config file is refused, and the server's
    log says so, before it is ever selected."""
    if request.model and (request.model != config.model.label or request.num_params != numel):
        shipped = " (or set net.ship_program = true to train the program it ships)" if config.net.ship_program else ""
        raise WireError("mismatch", f"client {cid} trains {request.model} with {request.num_params} parameters, the "
                                    f"server {config.model.label} with {numel}: start the client with the server's "
                                    f"config file{shipped}")
    if request.pipeline and request.pipeline != pipeline:
        raise WireError("mismatch", f"client {cid}'s update pipeline {request.pipeline} differs from the server's "
                                    f"{pipeline} (fl.strategy, fl.privacy, fl.compression): start the client with "
                                    "the server's config file")
    strategy, cap = config.fl.strategy, config.fl.bounds.max_examples
    if request.num_examples < 0 or (cap and request.num_examples > cap):
        raise WireError("malformed", f"client {cid}: {request.num_examples} examples is outside "
                                     f"[0, {cap or 'any'}] (fl.bounds.max_examples)")
    if strategy.name == "secagg" and strategy.weighting == "examples" \
            and request.num_examples > strategy.secagg.max_weight:  # its weight would not fit the ring
        raise WireError("malformed", f"client {cid}: {request.num_examples} examples is above "
                                     f"fl.strategy.secagg.max_weight = {strategy.secagg.max_weight}")


def check_claims(h: Any, declared: int, what: str) -> None:
    """An update's weight is never more than its client declared when it registered, and its loss is finite."""
    if not 1 <= h.num_examples <= declared:
        raise WireError("malformed", f"{what}: num_examples {h.num_examples} is outside [1, {declared}] "
                                     "(what the client declared when it registered)")
    if not math.isfinite(h.train_loss):
        raise WireError("nonfinite", f"{what}: train_loss is {h.train_loss}")


def check_evaluation(h: Any, what: str) -> None:
    """An evaluation's header carries figures in range and no tensor."""
    if h.HasField("tensor") or h.parts or h.codec:
        raise WireError("malformed", f"{what}: an evaluation carries figures, not a tensor")
    if h.num_examples < 0 or not 0 <= h.eval_accuracy <= 1 or not math.isfinite(h.eval_loss):
        raise WireError("malformed", f"{what}: num_examples {h.num_examples}, accuracy {h.eval_accuracy}, "
                                     f"loss {h.eval_loss}")


def check_secagg_header(h: Any, numel: int, cohort: int, what: str) -> None:
    """A secure-aggregation message's declared size (at most a masked model plus the cohort's keys) and claims."""
    limit = 8 * (numel + 2) + 256 * (cohort + 1) + 64
    if not 0 < h.num_bytes <= limit:
        raise WireError("oversized" if h.num_bytes > limit else "malformed",
                        f"{what}: declares {h.num_bytes} bytes (at most {limit})")
    if not math.isfinite(h.train_loss) or h.num_examples < 0:
        raise WireError("malformed", f"{what}: train_loss {h.train_loss}, num_examples {h.num_examples}")


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
    if not all_finite(delta):
        raise WireError("nonfinite", f"{what}: decompresses to NaN/Inf values")
    return delta
