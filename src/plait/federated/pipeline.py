"""The update pipeline between local training and aggregation, each stage optional.

    client: [attack, simulation only] → clip + local-DP noise → compress (with error feedback)  → wire
    server: decompress → [central DP: clip] → robust / weighted aggregate → [central DP: noise] → server optimizer

Local-DP noise is added before compression, not after: compression is then post-processing of a DP release (the
guarantee holds unchanged), and the noised update still travels compressed. The client-side error-feedback residual
lives with each client (here: in the simulated client's memory, not in the server checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from plait.core.compress import Codec, Encoded, ErrorFeedback, make_codec
from plait.federated.privacy.config import PrivacyConfig
from plait.federated.privacy.local import LocalDP
from plait.federated.seeds import noise_generator, stage_seed


@dataclass(kw_only=True, slots=True)
class CompressionConfig:
    codec: Literal["none", "fp16", "int8", "qsgd", "topk", "randk"] = "none"
    levels: int = 16              # qsgd: quantisation levels
    ratio: float = 0.01           # topk, randk: share of coordinates sent
    block_size: int = 0           # int8: elements per scale (0: one scale for the whole update)
    unbiased: bool = False        # randk: scale kept values by d/k (use without error feedback)
    error_feedback: bool = False  # clients keep what the codec dropped and add it to their next update

    def __post_init__(self) -> None:
        self.build()  # validates the options (ValueError naming compression.*)

    def build(self) -> Codec:
        options = {"qsgd": {"levels": self.levels}, "topk": {"ratio": self.ratio},
                   "int8": {"block_size": self.block_size},
                   "randk": {"ratio": self.ratio, "unbiased": self.unbiased}}.get(self.codec, {})
        return make_codec(self.codec, **options)


class ClientStages:
    """The client half: clip → local-DP noise → compress. `encode` runs on the client, `decode` on the server."""

    def __init__(self, privacy: PrivacyConfig, compression: CompressionConfig, seed: int):
        self.seed, self.seeded_noise = seed, privacy.seeded_noise
        self.local_dp = LocalDP(privacy.clip_norm, privacy.noise_multiplier) if privacy.mode == "local" else None
        self.codec = compression.build()
        self.feedback: dict[int, ErrorFeedback] | None = {} if compression.error_feedback else None

    def encode(self, client_id: int, delta: torch.Tensor, round_idx: int) -> Encoded:
        generator = torch.Generator().manual_seed(stage_seed(self.seed, round_idx, client_id, 1))  # codec sampling
        if self.local_dp is not None:
            delta = self.local_dp(delta, noise_generator(self.seeded_noise, self.seed, round_idx, client_id, 1))
        if self.feedback is not None:
            return self.feedback.setdefault(client_id, ErrorFeedback(self.codec)).compress(delta, generator)
        return self.codec.encode(delta, generator)

    def residuals(self) -> dict[int, torch.Tensor]:
        """What error feedback still owes each client (kept in checkpoints, so a resumed run loses nothing)."""
        if self.feedback is None:
            return {}
        return {cid: fb.residual for cid, fb in self.feedback.items() if fb.residual is not None}

    def load_residuals(self, residuals: dict[int, torch.Tensor]) -> None:
        if self.feedback is None:
            return
        for cid, residual in residuals.items():
            self.feedback.setdefault(int(cid), ErrorFeedback(self.codec)).residual = residual

    def decode(self, client_id: int, enc: Encoded) -> torch.Tensor:
        try:
            return self.codec.decode(enc)
        except ValueError as err:
            raise ValueError(f"client {client_id}: decompressing the update failed: {err}") from err
