"""Weights users can take away: the final model as a `state_dict` in a safetensors file, loadable into the user's
own module with one line:

    model.load_state_dict(safetensors.torch.load_file("runs/NAME/model.safetensors"))

Every run directory gets `model.safetensors` at the end of the run; `plait export RUN_DIR` writes it for a run
that has only its checkpoint. safetensors holds tensors and nothing else: loading it never runs code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from plait.core.flat import FlatSpec
from plait.federated.device import CPU, model_device
from plait.federated.weights import pointed_at
from plait.runtime.checkpoint import save_weights_file


def state_dict_of(model: torch.nn.Module, spec: FlatSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's state_dict with the federated tensors taken from `flat` (others, e.g. integer buffers, as the
    model holds them), on the CPU wherever the model trained."""
    with pointed_at(model, spec, flat.detach().to(model_device(model))):
        return {name: tensor.detach().to(CPU, copy=True).contiguous() for name, tensor in model.state_dict().items()}


def save_weights(model: torch.nn.Module, spec: FlatSpec, flat: torch.Tensor, run_path: Path) -> Path:
    if flat.dim() == 2:  # server-less gossip: one model per node; the average model is the run's
        flat = flat.mean(0)
    return save_weights_file(run_path, state_dict_of(model, spec, flat))


def export_run(run_dir: Path) -> Path:
    """`plait export RUN_DIR`: model.safetensors from a federated run's config.toml and last checkpoint."""
    from plait.data.shakespeare import VOCAB
    from plait.federated.components import build_model
    from plait.federated.config import FederatedRunConfig
    from plait.federated.weights import flat_model_state
    from plait.runtime.checkpoint import load_checkpoint
    from plait.settings.config import from_dict, load_toml

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt: not a federated run directory, or not started")
    raw = load_toml(run_dir / "config.toml")
    raw.pop("net", None)  # a network run: its model, data and fl tables are the simulator's
    if "fl" not in raw and ("parallel" in raw or "sync" in raw or "train" in raw):
        raise ValueError(f"{run_dir} is a cluster run (plait train): plait export reads federated runs (plait run, "
                         "plait fl server); a cluster run writes its model.safetensors when it ends (docs/api.md)")
    config = from_dict(FederatedRunConfig, raw)
    num_classes = len(VOCAB) if config.model.name == "char_lstm" else 0
    model = build_model(config.model, num_classes)
    initial, spec = flat_model_state(model, buffers=config.fl.buffers == "federated")
    params = load_checkpoint(run_dir / "checkpoint.pt")["params"]
    if params.shape[-1] != initial.numel():
        raise ValueError(f"{run_dir}/checkpoint.pt holds {params.shape[-1]} values per model, the config's model "
                         f"{config.model.label} has {initial.numel()}")
    return save_weights(model, spec, params, run_dir)
