"""Local DP: each client clips its own delta to norm C and adds N(0, (z·C)² I) before it leaves the device, so the
server (and anyone on the wire) only ever sees noised updates. Far noisier than central DP for the same ε: the noise
of every client adds up instead of one draw for the sum."""

from __future__ import annotations

import torch

from plait.core.clip import clip_to_norm, gaussian_noise


class LocalDP:
    def __init__(self, clip_norm: float, noise_multiplier: float):
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier

    def __call__(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        clipped, _ = clip_to_norm(delta, self.clip_norm)
        return clipped + gaussian_noise(clipped.shape, self.noise_multiplier * self.clip_norm, generator,
                                        clipped.dtype, clipped.device)
