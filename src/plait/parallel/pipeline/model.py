"""Models as nn.Sequential, ready to be cut into stages: the presets, or the user's own (`model.factory`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from plait.core.models import mnist_2nn, mnist_cnn
from plait.parallel.pipeline.meta_init import LayerInit
from plait.parallel.pipeline.partition import as_layers
from plait.user_model import build_model

if TYPE_CHECKING:  # config.py imports this module
    from plait.parallel.pipeline.config import ModelSection


def deep_mlp(depth: int = 8, hidden: int = 256, num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    """Flatten, then `depth` Linear layers (ReLU between them): deep enough to cut into several equal stages.

    He initialisation: PyTorch's default shrinks a ReLU network's activations by ~√3 per layer, which stalls a deep
    MLP for hundreds of steps."""
    if depth < 2:
        raise ValueError(f"model.depth must be >= 2, got {depth}")
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, num_classes))
    for layer in layers[:-1]:
        he_init(layer)
    return nn.Sequential(*layers)


def he_init(layer: nn.Module) -> None:
    """A hidden Linear layer's He initialisation (deep_mlp's); anything else is left as it is."""
    if isinstance(layer, nn.Linear):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)


def preset_layer_init(section: ModelSection, num_layers: int) -> LayerInit | None:
    """What a meta-built preset adds to each layer's `reset_parameters()`: the MLP's He init on its hidden layers
    (the last Linear keeps PyTorch's default, as in deep_mlp); nothing for the others or the user's factory."""
    if section.factory or section.name != "mlp":
        return None

    def hidden_he_init(index: int, layer: nn.Module) -> None:
        if index < num_layers - 1:
            he_init(layer)
    return hidden_he_init


def build_sequential(name: str, depth: int = 8, hidden: int = 256) -> nn.Sequential:
    if name == "mlp":
        return deep_mlp(depth, hidden)
    if name == "2nn":
        return mnist_2nn(hidden)
    if name == "cnn":
        return mnist_cnn()
    raise ValueError(f"model.name = {name!r} cannot be pipelined; choose mlp, 2nn or cnn")


def build_pipeline_model(section: ModelSection) -> nn.Module:
    """The run's model, as the pipeline cuts it: the user's factory (which must return an nn.Sequential or an
    nn.ModuleList of blocks), or the preset `model.name`."""
    model = build_model(section, preset=lambda: build_sequential(section.name, section.depth, section.hidden))
    try:
        as_layers(model)
    except ValueError:
        raise ValueError(f"model.factory = {section.factory!r} returned a {type(model).__name__}, which the pipeline "
                         "cannot cut into stages: return an nn.Sequential (or an nn.ModuleList of blocks, each "
                         "taking the previous one's output)") from None
    return model
