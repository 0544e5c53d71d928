"""Split an nn.Sequential (or a list of blocks) into p contiguous stages.

Three ways to choose the boundaries (the index of the first layer of stages 1..p-1):
- explicit: given by the user;
- by parameter count: minimise the largest stage's parameter count;
- by measured time: forward + backward time of each layer, profiled on a sample batch, then the same balancing.
Balancing is the classic linear-partition problem: minimise the bottleneck (largest stage cost) over contiguous
splits, solved exactly by dynamic programming; ties put a boundary as late as possible, so a parameter-free layer
(ReLU, pooling) stays with the layer before it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


def as_layers(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return list(model.children())
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return list(model)
    raise ValueError(f"pipeline partitioning needs an nn.Sequential or a list of blocks, got {type(model).__name__}")


def check_boundaries(boundaries: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    bounds = [int(b) for b in boundaries]
    if len(bounds) != num_stages - 1:
        raise ValueError(f"parallel.boundaries needs {num_stages - 1} entries for {num_stages} stages, got {bounds}")
    previous = 0
    for b in bounds:
        if not previous < b < num_layers:
            raise ValueError(f"parallel.boundaries = {bounds} must be strictly increasing inside (0, {num_layers}): "
                             "every stage needs at least one layer")
        previous = b
    return bounds


def split_layers(model: nn.Module | Sequence[nn.Module], boundaries: Sequence[int]) -> list[nn.Sequential]:
    """The stages as nn.Sequential modules sharing the model's layers (no copy)."""
    layers = as_layers(model)
    bounds = check_boundaries(boundaries, len(layers), len(boundaries) + 1)
    edges = [0, *bounds, len(layers)]
    return [nn.Sequential(*layers[a:b]) for a, b in zip(edges, edges[1:])]


def balance(costs: Sequence[float], num_stages: int) -> list[int]:
    """Boundaries that minimise the largest stage cost over contiguous splits of `costs` into `num_stages`."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"parallel.stages = {num_stages} must be between 1 and the number of layers ({n})")
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest bottleneck for the first i layers in k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    bottleneck = best[num_stages][n] * (1 + 1e-12) + 1e-12
    # Greedy packing under the optimal bottleneck: each stage takes as many layers as fit, leaving one per later stage.
    bounds, start = [], 0
    for stage in range(num_stages - 1):
        end = start + 1
        while end < n - (num_stages - 1 - stage) and prefix[end + 1] - prefix[start] <= bottleneck:
            end += 1
        bounds.append(end)
        start = end
    return bounds


def param_costs(layers: Sequence[nn.Module]) -> list[float]:
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def balance_by_params(model: nn.Module | Sequence[nn.Module], num_stages: int) -> list[int]:
    return balance(param_costs(as_layers(model)), num_stages)


def profile_layer_times(model: nn.Module | Sequence[nn.Module], sample: torch.Tensor, repeats: int = 5,
                        warmup: int = 2) -> list[float]:
    """Median forward + backward seconds of each layer on `sample`, each layer timed on its real input."""
    layers = as_layers(model)
    inputs, x = [], sample
    with torch.no_grad():
        for layer in layers:
            inputs.append(x)
            x = layer(x)
    times = []
    for layer, x in zip(layers, inputs):
        samples = []
        for rep in range(warmup + repeats):
            xin = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = layer(xin)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            t1 = time.perf_counter()
            if rep >= warmup:
                samples.append(t1 - t0)
        layer.zero_grad(set_to_none=True)
        times.append(statistics.median(samples))
    return times


def balance_by_time(model: nn.Module | Sequence[nn.Module], sample: torch.Tensor, num_stages: int,
                    repeats: int = 5) -> list[int]:
    return balance(profile_layer_times(model, sample, repeats=repeats), num_stages)
