"""Atomic checkpoints: write a temporary file, fsync it, rename it over the old one, fsync the directory.

A crash at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CHECKPOINT_FILE = "checkpoint.pt"  # a run directory's checkpoint: the driver resumes a run that has one
WEIGHTS_FILE = "model.safetensors"  # the final model's state_dict: what a user takes away, in every plane


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch  # here, not at the top: torch-free processes (parameter servers) use atomic_write_bytes

    atomic_write_bytes(path, lambda f: torch.save(state, f))


def save_weights_file(run_path: Path, state_dict: dict[str, Any]) -> Path:
    """`run_path/model.safetensors`: the state_dict on the CPU, loadable into the user's module with one line
    (`model.load_state_dict(safetensors.torch.load_file(path))`); safetensors holds tensors only, never code."""
    from safetensors.torch import save_file

    path = Path(run_path) / WEIGHTS_FILE
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}, str(path))
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    # weights_only: a checkpoint is data, never code.
    state: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
    return state
