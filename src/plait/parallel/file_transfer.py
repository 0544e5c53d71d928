"""Copying a run directory's file from one rank to another over the process group, for nodes that share no file
system: a rank that torchrun placed on another node than before receives what its new node lacks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from plait.parallel.device import rank_device
from plait.runtime.checkpoint import atomic_write_bytes

MISSING = -1  # the size sent for a file the sending rank does not hold


def transfer_file(path: Path, src: int, dst: int) -> bool:
    """Send `path` from rank `src` to the same path on rank `dst` (a send/recv pair: only those two call it).
    Returns whether `dst` has the file now; a file `src` lacks is removed on `dst`, so the two agree."""
    rank, device = dist.get_rank(), rank_device()  # NCCL sends device tensors only
    if rank == src:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) if path.exists() else None
        dist.send(torch.tensor([MISSING if data is None else data.numel()], dtype=torch.int64, device=device), dst)
        if data is not None and data.numel():
            dist.send(data.to(device), dst)
        return data is not None
    if rank != dst:
        raise ValueError(f"transfer_file({path}): rank {rank} is neither the sender {src} nor the receiver {dst}")
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    if int(size) == MISSING:
        path.unlink(missing_ok=True)
        return False
    data = torch.empty(int(size), dtype=torch.uint8, device=device)
    if data.numel():
        dist.recv(data, src)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: f.write(data.cpu().numpy().tobytes()))
    return True


def ranks_holding(path: Path) -> list[int]:
    """The ranks whose node has `path` (collective: every rank calls it)."""
    held = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=rank_device())
    held[dist.get_rank()] = int(path.exists())
    dist.all_reduce(held)
    return [r for r, h in enumerate(held.tolist()) if h]
