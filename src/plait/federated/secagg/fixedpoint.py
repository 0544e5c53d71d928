"""Fixed-point encoding into the ring Z_{2^bits} (int64 tensors), and tight bit packing for the wire.

A client's vector is [round(n_k * clip(delta) * scale) ..., n_k]: the weighted update and its weight, so the
server's one unmasked sum gives both the numerator and the denominator of FedAvg's weighted mean. Negative values
wrap to the upper half of the ring (two's complement), and the sum decodes back as long as it fits in half.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def ring_mask(bits: int) -> int:
    return (1 << bits) - 1


def encode(delta: torch.Tensor, weight: int, *, clip: float, scale: float, bits: int) -> torch.Tensor:
    """[n_k * delta quantised, n_k] as int64 elements of Z_{2^bits}; float64 maths so rounding is exact enough."""
    flat = delta.detach().reshape(-1).to(torch.float64, copy=True).clamp_(-clip, clip)
    out = torch.empty(flat.numel() + 1, dtype=torch.int64)
    torch.round(flat.mul_(weight * scale), out=flat)
    out[:-1] = flat.to(torch.int64)
    out[-1] = weight
    return out.bitwise_and_(ring_mask(bits))


def decode(ring_sum: torch.Tensor, *, scale: float, bits: int) -> tuple[torch.Tensor, int]:
    """The signed sum (float64, the weighted updates' sum) and the total weight from an unmasked ring sum."""
    half = 1 << (bits - 1)
    signed = torch.where(ring_sum >= half, ring_sum - (1 << bits), ring_sum)
    return signed[:-1].to(torch.float64) / scale, int(signed[-1])


def packed_size(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack(values: torch.Tensor, bits: int) -> bytes:
    """Ring elements (int64 in [0, 2^bits)) as a little-endian bit string of exactly `bits` per element.

    64 elements of `bits` bits fill exactly `bits` 64-bit words, so element j of every block of 64 lands at the
    same word and shift: 64 vectorised shift-or steps pack the whole vector.
    """
    numel = values.numel()
    if bits % 8 == 0:
        raw = values.contiguous().numpy().astype("<i8", copy=False).view(np.uint8).reshape(-1, 8)
        return raw[:, : bits // 8].tobytes()
    blocks = -(-numel // 64)
    elems = np.zeros(blocks * 64, dtype=np.uint64)
    elems[:numel] = values.numpy()
    elems = elems.reshape(blocks, 64)
    words = np.zeros((blocks, bits), dtype=np.uint64)
    for j in range(64):
        word, shift = divmod(j * bits, 64)
        words[:, word] |= elems[:, j] << np.uint64(shift)
        if shift + bits > 64:  # the element straddles two words
            words[:, word + 1] |= elems[:, j] >> np.uint64(64 - shift)
    return words.astype("<u8", copy=False).tobytes()[: packed_size(numel, bits)]


def unpack(data: bytes, numel: int, bits: int) -> torch.Tensor:
    if len(data) != packed_size(numel, bits):
        raise ValueError(f"packed vector has {len(data)} bytes, {numel} elements of {bits} bits need "
                         f"{packed_size(numel, bits)}")
    if bits % 8 == 0:
        raw = np.zeros((numel, 8), dtype=np.uint8)
        raw[:, : bits // 8] = np.frombuffer(data, dtype=np.uint8).reshape(numel, bits // 8)
        return torch.from_numpy(raw.view("<i8").reshape(-1).astype(np.int64))
    blocks = -(-numel // 64)
    buf = np.zeros(blocks * bits * 8, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    words = buf.view("<u8").reshape(blocks, bits)
    elems = np.empty((blocks, 64), dtype=np.uint64)
    low = np.uint64(ring_mask(bits))
    for j in range(64):
        word, shift = divmod(j * bits, 64)
        col = words[:, word] >> np.uint64(shift)
        if shift + bits > 64:
            col |= words[:, word + 1] << np.uint64(64 - shift)
        elems[:, j] = col & low
    return torch.from_numpy(elems.reshape(-1)[:numel].astype(np.int64))
