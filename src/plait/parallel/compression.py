"""Gradient compression for data-parallel sync: a codec from `plait.core.compress`, with error feedback kept per
bucket (each bucket's residual is what earlier steps dropped from that bucket)."""

from __future__ import annotations

import torch

from plait.core.compress import Encoded, ErrorFeedback, make_codec


class GradCompressor:
    def __init__(self, codec: str, *, ratio: float, error_feedback: bool, seed: int):
        options = {"ratio": ratio} if codec in ("topk", "randk") else {}
        self.codec = make_codec(codec, seed=seed, **options)
        self.error_feedback = error_feedback
        self._feedback: dict[int, ErrorFeedback] = {}

    def compress(self, bucket_index: int, flat: torch.Tensor) -> Encoded:
        if not self.error_feedback:
            return self.codec.encode(flat)
        feedback = self._feedback.setdefault(bucket_index, ErrorFeedback(self.codec))
        return feedback.compress(flat)

    def decode(self, like: Encoded, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode another rank's payload: same codec, shape and dtype as ours, its tensors."""
        return self.codec.decode(Encoded(like.codec, like.shape, like.dtype, tensors, like.nbytes))
