"""Flat parameter vectors: a state_dict as one contiguous buffer per dtype, plus a spec to rebuild it.

Parameters travel and are averaged as flat buffers, the way DDP buckets and FSDP flat parameters do: one copy, one
message, vectorised maths. `unflatten` returns views into the buffer, so rebuilding costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # element offset inside the buffer of its dtype
    numel: int


@dataclass(frozen=True, slots=True)
class FlatSpec:
    """Where each named tensor lives inside the per-dtype flat buffers."""

    slots: tuple[TensorSlot, ...]
    sizes: dict[torch.dtype, int]  # total elements per dtype
    buffers: tuple[str, ...] = ()  # names of the slots that are module buffers (not parameters), if any

    @property
    def num_params(self) -> int:
        """Elements of the slots that are parameters (buffers, when present, follow them)."""
        return sum(slot.numel for slot in self.slots if slot.name not in self.buffers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)

    def numel(self, dtype: torch.dtype | None = None) -> int:
        return sum(self.sizes.values()) if dtype is None else self.sizes.get(dtype, 0)

    def nbytes(self) -> int:
        return sum(n * _itemsize(dtype) for dtype, n in self.sizes.items())

    def slots_of(self, dtype: torch.dtype) -> list[TensorSlot]:
        return [slot for slot in self.slots if slot.dtype == dtype]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def make_spec(tensors: dict[str, torch.Tensor], buffers: tuple[str, ...] = ()) -> FlatSpec:
    offsets: dict[torch.dtype, int] = {}
    slots = []
    for name, tensor in tensors.items():
        offset = offsets.get(tensor.dtype, 0)
        slots.append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset, tensor.numel()))
        offsets[tensor.dtype] = offset + tensor.numel()
    return FlatSpec(tuple(slots), dict(offsets), buffers)


def flatten(tensors: dict[str, torch.Tensor],
            spec: FlatSpec | None = None) -> tuple[dict[torch.dtype, torch.Tensor], FlatSpec]:
    """Copy `tensors` into one new contiguous buffer per dtype. Returns (buffers, spec)."""
    spec = spec or make_spec(tensors)
    if set(tensors) != set(spec.names):
        missing, extra = set(spec.names) - set(tensors), set(tensors) - set(spec.names)
        raise ValueError(f"state does not match the flat spec: missing {sorted(missing)}, unexpected {sorted(extra)}")
    buffers = {}
    for dtype, size in spec.sizes.items():
        slots = spec.slots_of(dtype)
        for slot in slots:
            tensor = tensors[slot.name]
            if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
                raise ValueError(f"{slot.name}: shape {tuple(tensor.shape)} {tensor.dtype}, the flat spec has "
                                 f"{slot.shape} {slot.dtype}")
        parts = [tensors[slot.name].detach().reshape(-1) for slot in slots]
        buffers[dtype] = torch.cat(parts) if parts else torch.empty(size, dtype=dtype)
    return buffers, spec


def unflatten(buffers: dict[torch.dtype, torch.Tensor], spec: FlatSpec) -> dict[str, torch.Tensor]:
    """Views into `buffers`, named and shaped as the original tensors (no copy)."""
    out = {}
    for slot in spec.slots:
        buffer = buffers[slot.dtype]
        if buffer.numel() != spec.sizes[slot.dtype]:
            raise ValueError(f"flat buffer of {slot.dtype} has {buffer.numel()} elements, "
                             f"spec wants {spec.sizes[slot.dtype]}")
        out[slot.name] = buffer[slot.offset : slot.offset + slot.numel].view(slot.shape)
    return out


def split_views(flat: torch.Tensor, spec: FlatSpec) -> dict[str, torch.Tensor]:
    """Differentiable views of a single-dtype flat tensor.

    Uses `torch.split` rather than slicing: the backward of split is one concatenation into a flat gradient, where
    each slice's backward would allocate and zero a full-size buffer.
    """
    if len(spec.sizes) != 1:
        raise ValueError(f"split_views needs a single-dtype spec, got dtypes {list(spec.sizes)}")
    pieces = torch.split(flat, [slot.numel for slot in spec.slots])
    return {slot.name: piece.view(slot.shape) for slot, piece in zip(spec.slots, pieces)}


def flat_params(module: torch.nn.Module) -> tuple[torch.Tensor, FlatSpec]:
    """The trainable parameters of `module` as one float buffer (a copy) and its spec."""
    params: dict[str, torch.Tensor] = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    buffers, spec = flatten(params)
    if len(buffers) != 1:
        raise ValueError(f"trainable parameters span several dtypes {list(buffers)}; cast the model to one dtype")
    return next(iter(buffers.values())), spec


def load_flat_params(module: torch.nn.Module, flat: torch.Tensor, spec: FlatSpec) -> None:
    """Copy a flat parameter buffer back into `module`'s parameters, in place."""
    views = split_views(flat.detach(), spec)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, view in views.items():
            params[name].copy_(view)
