"""The program file: one safetensors file whose tensors are the model's initial state (and the graphs' constants)
and whose metadata holds the graphs and their description as JSON; its identity is the SHA-256 of its bytes.

Reading it checks the size and the hash before anything else, so tampered bytes are refused unparsed. Then the
safetensors header is read with `json.loads` and the tensors by safetensors' own parser (raw little-endian bytes
into tensors of the declared dtype and shape; safetensors has no code path that unpickles).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

FORMAT = "plait.program/1"


def program_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_program(tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    # each tensor its own contiguous CPU copy: safetensors refuses tensors that share memory (tied weights)
    own = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    return save(own, metadata={"format": FORMAT, "program": json.dumps(description, sort_keys=True)})


def read_program(data: bytes, sha256: str, max_bytes: int) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, description) of a program whose bytes must hash to `sha256`; ValueError saying what is wrong."""
    from safetensors.torch import load

    if len(data) > max_bytes:
        raise ValueError(f"the program is {len(data)} bytes, more than net.max_program_bytes = {max_bytes}")
    actual = program_sha256(data)
    if actual != sha256:
        raise ValueError(f"the program's bytes hash to sha256 {actual[:16]}…, the server announced "
                         f"{sha256[:16]}…: refused, none of it was read")
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < header_len <= len(data) - 8:
        raise ValueError("the program is not a safetensors file (its header length is wrong)")
    try:
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        description = json.loads(metadata["program"]) if metadata.get("format") == FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise ValueError(f"the program's metadata is malformed ({type(err).__name__}: {err})") from err
    if description is None:
        raise ValueError(f"the program's format is {metadata.get('format')!r}, this client reads {FORMAT!r}")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors' parser raises its own SafetensorError on bad bytes
        raise ValueError(f"the program's tensors are malformed ({type(err).__name__}: {err})") from err
    return tensors, description
