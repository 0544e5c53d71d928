"""Pipelined inference: forward-only micro-batches through the stages; the last stage holds the outputs."""

from __future__ import annotations

import torch

from plait.parallel.pipeline.schedule import forward_only
from plait.parallel.pipeline.stage import PipelineStage


def pipelined_forward(stage: PipelineStage, batch_size: int, micro_batches: int,
                      inputs: torch.Tensor | None = None) -> torch.Tensor | None:
    """Outputs for a batch of `batch_size` (inputs on stage 0), split into `micro_batches`; None except last stage."""
    schedule = forward_only(stage.placement.num_stages, micro_batches, len(stage.chunks))
    return stage.forward_step(schedule, batch_size, inputs)


def pipelined_predict(stage: PipelineStage, num_examples: int, chunk: int, micro_batches: int,
                      inputs: torch.Tensor | None = None) -> torch.Tensor | None:
    """Serve a whole data set in chunks of `chunk` rows; each chunk is one pipelined forward."""
    outputs = []
    for start in range(0, num_examples, chunk):
        size = min(chunk, num_examples - start)
        part = inputs[start:start + size] if inputs is not None else None
        out = pipelined_forward(stage, size, min(micro_batches, size), part)
        if out is not None:
            outputs.append(out)
    return torch.cat(outputs) if outputs else None
