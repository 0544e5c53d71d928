"""One micro-batch's backward split in two, for zero-bubble schedules (Qi et al. 2023): B, the gradient w.r.t. the
stage's input (on the critical path: the previous stage waits for it), and W, the weight gradients (nothing waits
for them, so the schedule puts them where the stage would otherwise idle).

The forward runs the stage in segments, each ending at a layer with trainable parameters ([Flatten, Linear],
[ReLU, Linear], ...), each on a detached copy of the previous segment's output: every segment has its own autograd
graph. B walks the segments backwards asking autograd for each segment's input gradient alone (`torch.autograd.grad`,
which computes no weight gradient; graphs with parameters are retained) and keeps the gradient of each segment's
output, i.e. of its parameter layer's output; W asks each segment's graph for its parameters' gradients alone
(`inputs=`, so autograd runs only the parameter layer's node, not the ReLU before it), accumulated into `.grad`.
Together they do the work of one backward, each piece once. A layer that works in place (`inplace=True`) stays in
the segment before it (it may not modify a segment's detached input), and so does its backward, then run in B and
again in W. A stage that is not an nn.Sequential is one segment: still correct, but its W redoes the input-gradient
chain inside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _trainable(layers: list[nn.Module]) -> bool:
    return any(p.requires_grad for layer in layers for p in layer.parameters())


def _segments(module: nn.Module) -> list[list[nn.Module]]:
    """Consecutive layers, cut after each layer with trainable parameters (unless the next works in place)."""
    layers = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    groups: list[list[nn.Module]] = []
    for layer in layers:
        if not groups or (_trainable(groups[-1]) and not getattr(layer, "inplace", False)):
            groups.append([])
        groups[-1].append(layer)
    return groups


class SplitBackward:
    """A micro-batch's forward through one stage, kept for its B and then its W."""

    def __init__(self, module: nn.Module, x: torch.Tensor,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Run the forward; `finish` (the last stage's loss) is applied to the last segment's output."""
        # per segment: (its trainable parameters, its input, its output)
        self.segments: list[tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]] = []
        groups = _segments(module)
        for index, layers in enumerate(groups):
            if self.segments:
                previous = self.segments[-1][2]
                x = previous.detach().requires_grad_(previous.requires_grad)  # cut: this segment's own graph
            out = x
            for layer in layers:
                out = layer(out)
            if finish is not None and index == len(groups) - 1:
                out = finish(out)
            self.segments.append(([p for layer in layers for p in layer.parameters() if p.requires_grad], x, out))
        self._output_grads: dict[int, torch.Tensor | None] = {}  # filled by B, for the segments W must visit

    @property
    def output(self) -> torch.Tensor:
        return self.segments[-1][2]

    def backward_input(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """B: the gradient w.r.t. the stage's input, given its output's (None for a scalar loss). Returns None when
        the input needs no gradient (the first stage)."""
        for index in reversed(range(len(self.segments))):
            params, x, out = self.segments[index]
            self._output_grads[index] = grad
            if not x.requires_grad:
                return None  # nothing before this segment has a trainable parameter or a gradient to send
            (grad,) = torch.autograd.grad(out, x, grad, retain_graph=bool(params))  # W needs the graph again
        return grad

    def backward_weight(self) -> None:
        """W: accumulate the weight gradients into `.grad`, then free the graphs."""
        for index, grad in self._output_grads.items():
            params, _, out = self.segments[index]
            if params:
                torch.autograd.backward(out, grad, inputs=params)
        self.segments.clear()
        self._output_grads.clear()
