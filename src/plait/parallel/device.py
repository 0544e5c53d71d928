"""Where a rank's tensors live, chosen once per rank and passed down: every tensor a cluster plane creates (loss
accumulators, status flags, receive buffers, shape headers, metrics) is made on this device or on the device of a
tensor it already has, never on a hard-coded one.

- CUDA present and the group's backend is NCCL (or no group yet): `cuda:LOCAL_RANK` (torchrun and `spawn_ranks`
  set LOCAL_RANK), so the ranks of one node take one GPU each;
- otherwise (no CUDA, or gloo chosen on purpose): the CPU. Gloo's point-to-point takes CPU tensors only, so a gloo
  run keeps everything on the CPU even on a GPU machine.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# The host, on purpose: meta-built layers are initialised here whatever the rank's device (one random stream for every
# device type, so a GPU stage starts from a CPU reference's weights), then moved (pipeline/meta_init.py).
HOST = torch.device("cpu")


def rank_device(backend: str | None = None) -> torch.device:
    """This rank's device. `backend`: the process group's (default: the initialised group's, if any)."""
    if backend is None and dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    if not torch.cuda.is_available() or backend not in (None, "nccl"):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK = {local_rank} but this node has {count} CUDA devices: start at most {count} "
                         "ranks per node (--nproc / --nproc-per-node)")
    return torch.device("cuda", local_rank)


def use_device(device: torch.device) -> None:
    """Make `device` current for this process: NCCL's own buffers and object collectives use the current device."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
