"""Where clients train: `fl.device` (the simulator's clients and its evaluation) and `net.client_device` (a network
client) take "auto" | "cpu" | "cuda", resolved here once, at start.

The server's state (global weights, aggregation, checkpoints) stays on the CPU whatever the setting: a client
trains on its model's device, the weights and its batches moved there, and hands its update back on the CPU, so
aggregation is unchanged and a CPU run gives the same bits as before.
"""

from __future__ import annotations

import os

import torch

from plait.federated.task import Inputs
from plait.settings.config import ConfigError

CPU = torch.device("cpu")
SETTINGS = ("auto", "cpu", "cuda")


def resolve_device(setting: str, name: str, *, index: int | None = None) -> torch.device:
    """The device `setting` names ("auto": cuda when this process sees a GPU, else the CPU); `name` is the setting's
    key, for the error. `index`: which GPU (default: the current one; a torchrun rank passes its LOCAL_RANK). "cuda"
    without that GPU is a ConfigError rather than a silent CPU run."""
    if setting not in SETTINGS:
        raise ConfigError(f"{name} must be 'auto', 'cpu' or 'cuda', got {setting!r}")
    if setting == "cpu":
        return CPU
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index is None:
        index = torch.cuda.current_device() if count else 0
    if index < count:
        return torch.device("cuda", index)
    if setting == "auto":
        return CPU
    if not count:
        raise ConfigError(f"{name} = 'cuda' but this process sees no CUDA device (torch.cuda.is_available() is "
                          "False): use 'auto' or 'cpu'")
    raise ConfigError(f"{name} = 'cuda' asks for GPU {index} (LOCAL_RANK) but this node has {count}: start at most "
                      f"{count} ranks per node, or use 'auto'")


def local_rank() -> int:
    """This process's rank on its node (torchrun sets LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(setting: str, name: str) -> torch.device:
    """A torchrun rank's device: its own GPU, cuda:LOCAL_RANK, so the ranks of one node take one GPU each."""
    return resolve_device(setting, name, index=local_rank())


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model` lives (its first parameter's device; the CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else CPU


def on_device(x: Inputs, device: torch.device) -> Inputs:
    """Inputs (one tensor or a tuple) on `device`; no copy when they are there already."""
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
