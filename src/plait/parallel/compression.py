"""Gradient compression for data-parallel sync: a codec from `plait.core.compress`, with error feedback kept per
bucket (each bucket's residual is what earlier steps dropped from that bucket).

The residuals are training state like the momentum: each rank's differ, and a resumed run must get them back to
end where the uninterrupted run ends (train.py gathers them into the checkpoint). The codecs offered here (fp16,
top-k) draw no random numbers, so the residuals are the whole state. The codec comes built (`make_codec`, or the
config's `CompressionSection.build`)."""

from __future__ import annotations

import torch

from plait.core.compress import Codec, Encoded, ErrorFeedback


class GradCompressor:
    def __init__(self, codec: Codec, *, error_feedback: bool):
        self.codec = codec
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

    def residuals(self, bounds: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """Every bucket's residual laid out as the flat gradient (`bounds`: each bucket's [start, stop))."""
        flat = torch.zeros_like(like)
        for index, (start, stop) in enumerate(bounds):
            feedback = self._feedback.get(index)
            if feedback is not None and feedback.residual is not None:
                flat[start:stop] = feedback.residual.reshape(-1)
        return flat

    def load_residuals(self, flat: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
        for index, (start, stop) in enumerate(bounds):
            feedback = self._feedback.setdefault(index, ErrorFeedback(self.codec))
            feedback.residual = flat[start:stop].clone()
