"""Build a model on the meta device, then give real, seeded weights to only the layers this rank keeps.

`parallel.build = "meta"` (and `split_pipeline(build="meta")`): the model is constructed under
`torch.device("meta")` (shapes only, no memory), cut into stages by parameter count, and each layer of this rank's
stage is materialised alone: `to_empty` on the CPU, then every submodule's `reset_parameters()` (PyTorch's own
per-module initialiser, the one FSDP's meta-device path calls too) under the CPU generator seeded from
(seed, the layer's index in the whole Sequential), then moved to the rank's device. So a layer's initial weights
depend on nothing but the seed and its index: not on the other stages, the number of ranks or the device, and
`materialise(whole_model, seed=...)` in one process gives the very weights the pipeline starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from plait.parallel.device import HOST
from plait.parallel.pipeline.partition import as_layers

LayerInit = Callable[[int, nn.Module], None]  # (index in the whole Sequential, layer): a preset's own init


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model `factory()` returns, built under `torch.device("meta")`: every parameter and buffer a shape only."""
    with torch.device("meta"):
        return factory()


def is_on_meta(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


def layer_seed(seed: int, index: int) -> int:
    """The generator seed of layer `index`: distinct layers draw from distinct streams."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2 ** 63)


def check_initialisable(layer: nn.Module, index: int, setting: str = "parallel.build = 'meta'") -> None:
    """Every submodule that holds parameters or buffers itself must say how to initialise them."""
    for name, sub in layer.named_modules():
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if own and not callable(getattr(sub, "reset_parameters", None)):
            where = f"layer {index}" + (f" ({name})" if name else "")
            raise ValueError(f"{setting}: {where} is a {type(sub).__name__} holding parameters or buffers but no "
                             "reset_parameters() method, so its initial weights cannot be made on its own rank; "
                             "give it one (initialising its own tensors), or build the whole model (build = 'full')")


def init_layer(layer: nn.Module, *, seed: int, index: int, device: torch.device | None = None,
               extra: LayerInit | None = None, setting: str = "parallel.build = 'meta'") -> nn.Module:
    """Materialise one layer (in place) with its seeded initial weights, on `device` (default: the CPU).

    It is initialised on the CPU whatever the device, so a GPU rank starts from the weights a CPU reference has."""
    check_initialisable(layer, index, setting)
    layer.to_empty(device=HOST)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's global stream stays untouched
        torch.default_generator.manual_seed(layer_seed(seed, index))
        for sub in layer.modules():  # each submodule resets its own tensors (PyTorch's convention)
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
        if extra is not None:
            extra(index, layer)
    return layer.to(device) if device is not None else layer


def materialise(model: nn.Module | Sequence[nn.Module], *, seed: int, indices: Sequence[int] | None = None,
                device: torch.device | None = None, extra: LayerInit | None = None) -> list[nn.Module]:
    """Materialise the layers at `indices` (default: all) of a meta-built model, in place; the rest stay on meta.
    Returns the model's layers. One process calling it on the whole model gets the pipeline's initial weights."""
    layers = as_layers(model)
    for index in range(len(layers)) if indices is None else indices:
        init_layer(layers[index], seed=seed, index=index, device=device, extra=extra)
    return layers


def stage_layer_indices(boundaries: Sequence[int], num_layers: int, stage: int, num_stages: int) -> list[int]:
    """The indices of the layers stage `stage` holds: its piece, or with chunks per rank (len(boundaries) + 1 pieces
    over num_stages ranks) its pieces stage, stage + p, ..."""
    edges = [0, *boundaries, num_layers]
    return [i for piece in range(stage, len(edges) - 1, num_stages) for i in range(edges[piece], edges[piece + 1])]
