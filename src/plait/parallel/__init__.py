"""Trusted-cluster training: launch, collectives, data / model / pipeline parallelism, checkpoints.

Your own model in your own training loop (docs/api.md): `wrap` makes a module data parallel (gradients averaged by
the chosen all-reduce as backward runs), `split_pipeline` cuts an nn.Sequential into pipeline stages, one per rank.
"""

from plait.parallel.pipeline.split import PipelineParallel, split_pipeline
from plait.parallel.wrap import DataParallelModule, wrap

__all__ = ["DataParallelModule", "PipelineParallel", "split_pipeline", "wrap"]
