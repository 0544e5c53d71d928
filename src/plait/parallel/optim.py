"""The cluster trainers' optimizer (data parallel, pipeline): SGD (momentum, weight decay), Adam or AdamW as
`torch.optim` runs them, and the optimizer's state as flat tensors, so a checkpoint holds, and a resume broadcasts,
one tensor per kind of state (`momentum_buffer`, `exp_avg`, `exp_avg_sq`, `step`) instead of one per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
# Builds the optimizer over whichever parameters a rank steps (its replica, its ZeRO slice, its stage).
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _unknown(name: str, section: str) -> str:
    return f"{section}.optimizer = {name!r} is unknown; choose one of {list(OPTIMIZERS)}"


def check_optimizer(name: str, section: str = "train") -> None:
    if name not in OPTIMIZERS:
        raise ValueError(_unknown(name, section))


def check_optimizer_settings(config, section: str) -> None:
    """The optimizer name and Adam's settings of a config section that has `optimizer`, `beta1`, `beta2`, `eps`."""
    check_optimizer(config.optimizer, section)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(config, key) < 1:
            raise ValueError(f"{section}.{key} must be in [0, 1), got {getattr(config, key)}")
    if not config.eps > 0:
        raise ValueError(f"{section}.eps must be > 0, got {config.eps}")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The `train.optimizer` name of an optimizer `build_optimizer` made (stored in checkpoints with its state)."""
    return type(optimizer).__name__.lower()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer steps with now (every parameter group shares it here)."""
    return float(optimizer.param_groups[0]["lr"])


def state_matches(saved: str, wanted: str, say: bool) -> bool:
    """Whether a checkpoint's optimizer state (written by `saved`) can be loaded into `wanted`; if not, the state
    starts again from zero, and `say` prints a note saying so (one rank says it)."""
    if saved != wanted and say:
        print(f"note: the checkpoint's optimizer state is {saved}'s, this run uses train.optimizer = {wanted!r}: its "
              "state starts again from zero", flush=True)
    return saved == wanted


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str = "sgd", *, lr: float, momentum: float = 0.0,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """`momentum` is SGD's; `betas` and `eps` are Adam's and AdamW's (AdamW decays the weights apart from the
    gradient, Adam adds `weight_decay` x weights to it, as in torch.optim)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam_like = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in adam_like:
        raise ValueError(_unknown(name, "train"))
    return adam_like[name](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_factory(name: str = "sgd", *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> OptimizerFactory:
    """`build_optimizer` with its settings bound, for a trainer that builds the optimizer over its own share of the
    parameters (picklable, so it can be handed to spawned ranks)."""
    check_optimizer(name)
    return partial(build_optimizer, name=name, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas,
                   eps=eps)


def section_optimizer(section: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer a `[train]` section describes (`optimizer`, `lr`, `momentum`, `weight_decay`, `beta1`, `beta2`,
    `eps`; checked when the config was loaded) over `params`."""
    return build_optimizer(params, section.optimizer, lr=section.lr, momentum=section.momentum,
                           weight_decay=section.weight_decay, betas=(section.beta1, section.beta2), eps=section.eps)


def flat_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The state of every parameter laid end to end in `params` order: a tensor of sum(numel) per per-element state,
    and a 0-dim tensor per scalar state (Adam's step count, the same for every parameter of a trainer that steps
    them together). Empty before the first step (SGD without momentum has no state at all)."""
    states = [optimizer.state.get(p) for p in params]
    if not states or any(not s for s in states):
        return {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in states[0].items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 0:
            flat[key] = value.detach().clone()
        else:
            flat[key] = torch.cat([s[key].detach().reshape(-1) for s in states])
    return flat


def load_flat_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    flat: dict[str, torch.Tensor]) -> None:
    """The inverse of `flat_state`: every parameter's state becomes its own copy of its slice (or of the scalar)."""
    total = sum(p.numel() for p in params)
    for key, value in flat.items():
        if value.dim() > 0 and value.numel() != total:
            raise ValueError(f"optimizer state {key!r} holds {value.numel()} values, the parameters {total}: "
                             "was the model changed?")
    offset = 0
    for p in params:
        state = optimizer.state[p]
        for key, value in flat.items():
            if value.dim() == 0:
                state[key] = value.detach().cpu().clone()  # torch.optim keeps step counts on the CPU
            else:
                state[key] = value[offset : offset + p.numel()].view_as(p).to(p.device).clone()
        offset += p.numel()
