"""The federated model state as one flat float vector, and a model pointed at such a vector.

The vector holds the model's trainable parameters and, when `fl.buffers = "federated"`, its floating buffers
(BatchNorm's running mean and variance) after them: the same weighted mean averages both. With
`fl.buffers = "local"` (FedBN, Li et al. 2021) the buffers stay with each client and only parameters travel.
Integer buffers (BatchNorm's `num_batches_tracked`) never travel.

`pointed_at` makes the model's parameters (and buffers) views into such vectors for the duration of a block, as
DDP and FSDP flatten parameters: training then writes the vector in place, with no per-step gather or copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from plait.core.flat import FlatSpec, flatten, make_spec, split_views


def floating_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if b is not None and b.is_floating_point()}


def flat_model_state(model: torch.nn.Module, *, buffers: bool) -> tuple[torch.Tensor, FlatSpec]:
    """(a copy of) the parameters, then the floating buffers when `buffers`, as one flat vector, and its spec."""
    tensors: dict[str, torch.Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    extra = floating_buffers(model) if buffers else {}
    tensors.update(extra)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the model's parameters and buffers span several dtypes {sorted(map(str, dtypes))}; "
                         "cast the model to one dtype")
    spec = make_spec(tensors, buffers=tuple(extra))
    flat, _ = flatten(tensors, spec)
    return next(iter(flat.values())).clone(), spec


def local_buffer_state(model: torch.nn.Module) -> tuple[torch.Tensor, FlatSpec] | None:
    """The floating buffers alone (a client's own, with `fl.buffers = "local"`), or None for a model without."""
    tensors = floating_buffers(model)
    if not tensors:
        return None
    spec = make_spec(tensors, buffers=tuple(tensors))
    flat, _ = flatten(tensors, spec)
    return next(iter(flat.values())).clone(), spec


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


@contextmanager
def pointed_at(model: torch.nn.Module, spec: FlatSpec, flat: torch.Tensor, grad: torch.Tensor | None = None,
               local: tuple[torch.Tensor, FlatSpec] | None = None) -> Iterator[None]:
    """Within the block, the model's tensors named in `spec` are views into `flat` (parameter gradients into
    `grad`), and those named in `local`'s spec views into its vector; everything is restored on exit."""
    params = dict(model.named_parameters())
    restore: list[tuple[torch.nn.Module, str, torch.Tensor | None]] = []
    saved = {name: (p.data, p.grad) for name, p in params.items()}
    grads = split_views(grad, spec) if grad is not None else {}
    try:
        groups = [(spec, flat)] + ([(local[1], local[0])] if local is not None else [])
        for group_spec, vector in groups:
            for name, view in split_views(vector, group_spec).items():
                if name in group_spec.buffers:
                    owner, leaf = _owner(model, name)
                    restore.append((owner, leaf, owner._buffers[leaf]))
                    owner._buffers[leaf] = view
                else:
                    params[name].data = view
                    if name in grads:
                        params[name].grad = grads[name]
        yield
    finally:
        for owner, leaf, original in reversed(restore):
            owner._buffers[leaf] = original
        for name, (memory, old_grad) in saved.items():
            params[name].data, params[name].grad = memory, old_grad
