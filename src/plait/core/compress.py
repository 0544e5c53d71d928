"""Compression codecs for updates and gradients: pure functions on tensors, shared by FL and data-parallel training.

    codec = make_codec("qsgd", levels=16)
    enc = codec.encode(x, generator=g)      # Encoded: the tensors that would travel + their size on the wire
    y = codec.decode(enc)                   # same shape and dtype as x

Codecs ("none", "fp16", "int8", "qsgd", "topk", "randk") and their error bounds, per element of x (d = x.numel()):

- fp16: relative error <= 2^-11 inside fp16's normal range (|x| in [6.1e-5, 65504]); 2 bytes per element.
- int8: one fp32 scale s = max|x| / 127 per block of `block_size` elements; |error| <= s / 2; 1 byte per element.
- qsgd (Alistar et al. 2017): x_i = ||x|| · sign(x_i) · l_i / levels with l_i rounded stochastically between the two
  nearest levels, so E[decode] = x and |error| <= ||x|| / levels. Levels travel as int8 (levels <= 127) or int16.
- topk: the k = ceil(ratio · d) largest |x_i| with their int32 indices; what is dropped is exactly the rest.
- randk: k coordinates drawn uniformly; only the values and the 8-byte seed that regenerates the indices travel.
  With `unbiased=True` values are scaled by d / k so E[decode] = x (use without error feedback).

`nbytes` counts the payload tensors only: shape and dtype are known to both ends (the flat spec), as in DDP buckets.
Sparsifiers lose information by design; wrap them in `ErrorFeedback` (Seide et al. 2014; Stich et al. 2018), which
adds back what earlier calls dropped, so nothing is lost for good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

CODECS = ("none", "fp16", "int8", "qsgd", "topk", "randk")


@dataclass(slots=True)
class Encoded:
    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # what travels
    nbytes: int = 0                                                  # bytes on the wire (payload)


def _payload(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Codec(Protocol):
    name: str

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded: ...
    def decode(self, enc: Encoded) -> torch.Tensor: ...


class _Base:
    name = "none"

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._own: torch.Generator | None = None

    def _generator(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator:
        """The caller's generator, or the codec's own seeded one (randomness is always seeded)."""
        if generator is not None:
            return generator
        if self._own is None or self._own.device != x.device:
            self._own = torch.Generator(device=x.device).manual_seed(self._seed)
        return self._own

    def _wrap(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Encoded:
        return Encoded(self.name, tuple(x.shape), x.dtype, tensors, _payload(tensors))

    def _check(self, enc: Encoded) -> None:
        if enc.codec != self.name:
            raise ValueError(f"compression: a {enc.codec!r} payload given to the {self.name!r} decoder")


class NoCodec(_Base):
    name = "none"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        return self._wrap(x, {"values": x.detach().reshape(-1)})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        return enc.tensors["values"].view(enc.shape)


class Fp16Codec(_Base):
    name = "fp16"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        return self._wrap(x, {"values": x.detach().reshape(-1).to(torch.float16)})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        return enc.tensors["values"].to(enc.dtype).view(enc.shape)


class Int8Codec(_Base):
    """Symmetric linear quantisation with one scale per block (0: one block for the whole tensor)."""

    name = "int8"

    def __init__(self, block_size: int = 0, seed: int = 0):
        super().__init__(seed)
        if block_size < 0:
            raise ValueError(f"compression.block_size must be >= 0 (0: one block), got {block_size}")
        self.block_size = block_size

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        size = self.block_size or max(flat.numel(), 1)
        pad = -flat.numel() % size
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, size)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        blocks = self._blocks(x.detach().reshape(-1).float())
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block: any scale decodes to 0
        q = torch.round(blocks / safe).clamp_(-127, 127).to(torch.int8)
        return self._wrap(x, {"q": q.reshape(-1)[: x.numel()], "scale": scale.reshape(-1)})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        q, scale = enc.tensors["q"], enc.tensors["scale"]
        numel = q.numel()
        blocks = self._blocks(q.float())
        return (blocks * scale.view(-1, 1)).reshape(-1)[:numel].to(enc.dtype).view(enc.shape)


class QSGDCodec(_Base):
    """Stochastic quantisation to `levels` levels of |x_i| / ||x||_2, unbiased."""

    name = "qsgd"

    def __init__(self, levels: int = 16, seed: int = 0):
        super().__init__(seed)
        if not 1 <= levels <= 32767:
            raise ValueError(f"compression.levels must be in [1, 32767], got {levels}")
        self.levels = levels

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        flat = x.detach().reshape(-1).float()
        norm = flat.norm().reshape(1)
        scaled = flat.abs() / torch.where(norm > 0, norm, torch.ones_like(norm)) * self.levels
        lower = scaled.floor()
        u = torch.rand(flat.shape, generator=self._generator(x, generator), device=flat.device)
        level = lower + (u < scaled - lower).float()  # round up with probability equal to the remainder
        dtype = torch.int8 if self.levels <= 127 else torch.int16
        signed = (level * flat.sign()).to(dtype)
        return self._wrap(x, {"levels": signed, "norm": norm})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        values = enc.tensors["levels"].float() * (enc.tensors["norm"] / self.levels)
        return values.to(enc.dtype).view(enc.shape)


class TopKCodec(_Base):
    name = "topk"

    def __init__(self, ratio: float = 0.01, seed: int = 0):
        super().__init__(seed)
        if not 0 < ratio <= 1:
            raise ValueError(f"compression.ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        flat = x.detach().reshape(-1)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        _, idx = flat.abs().topk(k, sorted=False)
        return self._wrap(x, {"indices": idx.to(torch.int32), "values": flat[idx]})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        out = torch.zeros(math.prod(enc.shape), dtype=enc.dtype, device=enc.tensors["values"].device)
        out[enc.tensors["indices"].long()] = enc.tensors["values"].to(enc.dtype)
        return out.view(enc.shape)


class RandKCodec(_Base):
    name = "randk"

    def __init__(self, ratio: float = 0.01, unbiased: bool = False, seed: int = 0):
        super().__init__(seed)
        if not 0 < ratio <= 1:
            raise ValueError(f"compression.ratio must be in (0, 1], got {ratio}")
        self.ratio, self.unbiased = ratio, unbiased

    @staticmethod
    def _indices(seed: int, numel: int, k: int, device: torch.device) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)  # CPU: the same indices on both ends, any device
        return torch.randperm(numel, generator=g)[:k].to(device)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        flat = x.detach().reshape(-1)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        seed = torch.randint(0, 2**62, (1,), generator=self._generator(x, generator), device=x.device).cpu()
        values = flat[self._indices(int(seed), flat.numel(), k, flat.device)]
        if self.unbiased:
            values = values * (flat.numel() / k)
        return self._wrap(x, {"seed": seed, "values": values})

    def decode(self, enc: Encoded) -> torch.Tensor:
        self._check(enc)
        values = enc.tensors["values"]
        numel = math.prod(enc.shape)
        out = torch.zeros(numel, dtype=enc.dtype, device=values.device)
        out[self._indices(int(enc.tensors["seed"]), numel, values.numel(), values.device)] = values.to(enc.dtype)
        return out.view(enc.shape)


def make_codec(name: str, **options: Any) -> Codec:
    """A codec by name; options are the constructor's keywords (levels, ratio, block_size, unbiased, seed)."""
    classes: dict[str, Callable[..., Codec]] = {"none": NoCodec, "fp16": Fp16Codec, "int8": Int8Codec,
                                                "qsgd": QSGDCodec, "topk": TopKCodec,
               "randk": RandKCodec}
    if name not in classes:
        raise ValueError(f"compression.codec = {name!r} is unknown; choose one of {list(classes)}")
    try:
        return classes[name](**options)
    except TypeError as err:
        raise ValueError(f"compression codec {name!r}: bad options {sorted(options)}: {err}") from err


class ErrorFeedback:
    """Compress `x + residual` and keep as the new residual what the codec dropped, for the next call."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.residual: torch.Tensor | None = None

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        if self.residual is not None and self.residual.numel() != x.numel():
            raise ValueError(f"error feedback: residual has {self.residual.numel()} elements, input {x.numel()}")
        corrected = x.detach() if self.residual is None else x.detach() + self.residual.view_as(x)
        enc = self.codec.encode(corrected, generator)
        self.residual = corrected - self.codec.decode(enc)
        return enc

    def reset(self) -> None:
        self.residual = None
