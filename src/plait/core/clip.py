"""Clipping and Gaussian noise for differential privacy: pure functions on flat tensors, generators injected."""

from __future__ import annotations

import torch


def clip_to_norm(x: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x · min(1, max_norm / ||x||_2)` and the norm before clipping (a 0-dim tensor: no host sync here)."""
    if max_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    norm = x.norm()
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return x * factor, norm


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Isotropic N(0, std²) noise from an injected generator."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return torch.randn(shape, generator=generator, dtype=dtype, device=device) * std
