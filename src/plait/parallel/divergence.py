"""Stop where training diverges, on every rank at once (`train.on_divergence = "stop" | "skip"`).

Every step, once the gradients are synced and before the optimizer steps, each rank flags what it holds that is not
finite: its loss, its gradient after the sync (the aggregate), and its parameters (what the previous step's update
made of them). The flags of all ranks travel in one tiny all-reduce, so every rank takes the same decision and none
is left waiting in a collective:

- "stop": every rank raises `Diverged`, naming the step, the ranks and the last good checkpoint (left as it was, so
  `--resume` can start from it with other settings);
- "skip": the step's update is not applied (the optimizer's state stays as it was) and training goes on. Parameters
  that are already non-finite cannot be repaired by skipping: they stop the run either way.

Before a checkpoint the parameters are checked again, so no checkpoint ever holds a diverged model.

A tensor is finite when its sum is: a NaN or Inf anywhere makes the sum non-finite (so does a sum beyond the float
range, itself a sign of divergence), and one reduction per tensor costs far less than the step. The decision is
taken on the host: one small collective and one host sync per step, the price of stopping where divergence arises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from plait.runtime.divergence import Diverged, last_good_checkpoint

POLICIES = ("stop", "skip")
_LOSS, _GRADIENT, _PARAMETERS = range(3)


def check_policy(on_divergence: str, section: str = "train") -> None:
    if on_divergence not in POLICIES:
        raise ValueError(f"{section}.on_divergence = {on_divergence!r} is unknown; choose one of {list(POLICIES)}")


def _not_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    sums = [t.detach().float().sum() for t in tensors if t is not None and t.numel() > 0]
    return ~torch.isfinite(torch.stack(sums).sum()) if sums else None


class DivergenceGuard:
    """One rank's check; `checkpoint_path` and `last_good` (the step of the checkpoint a resumed run started from,
    None for a fresh run) say where a stopped run can resume. `rank_name` says what a rank is (its stage, say),
    `gradient_name` what the checked gradient is."""

    def __init__(self, on_divergence: str, checkpoint_path: Path, *, last_good: int | None, device: torch.device,
                 rank_name: Callable[[int], str] = lambda rank: f"rank {rank}",
                 gradient_name: str = "gradient after the sync"):
        check_policy(on_divergence)
        self.on_divergence, self.checkpoint_path, self.last_good = on_divergence, checkpoint_path, last_good
        self.device, self.rank_name, self.gradient_name = device, rank_name, gradient_name
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.skipped: dict[int, str] = {}  # step -> what was not finite, for the run's records

    def before_update(self, step: int, *, loss: torch.Tensor | None = None, grads: Iterable[torch.Tensor] = (),
                      params: Iterable[torch.Tensor] = ()) -> bool:
        """Collective. True: apply step `step`'s update. False: skip it ("skip"). Raises `Diverged` ("stop")."""
        return self._agree(step, {_LOSS: [loss] if loss is not None else [], _GRADIENT: grads, _PARAMETERS: params},
                           params_step=step - 1)

    def before_checkpoint(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """Collective. Raises `Diverged` if step `step`'s update left any rank's parameters non-finite."""
        self._agree(step, {_PARAMETERS: params}, params_step=step)

    def saved(self, step: int) -> None:
        """A checkpoint of `step` is on disk: a later divergence names it."""
        self.last_good = step

    def _agree(self, step: int, tensors: dict[int, Iterable[torch.Tensor]], params_step: int) -> bool:
        flags = torch.zeros(self.world_size, 3, device=self.device)
        for kind, group in tensors.items():
            bad = _not_finite(group)
            if bad is not None:
                flags[self.rank, kind] = bad.float()
        dist.all_reduce(flags)  # every rank's flags on every rank: the same decision everywhere
        flagged = flags.cpu()  # the step's one host sync
        if not bool(flagged.any()):
            return True
        what = self._describe(step, flagged, params_step)
        repairable = not bool(flagged[:, _PARAMETERS].any())
        if self.on_divergence == "skip" and repairable:
            self.skipped[step] = what
            return False
        advice = ("skipping cannot repair the parameters" if self.on_divergence == "skip"
                  else "lower train.lr, or set it to 'skip'")
        raise Diverged(f"{what} (train.on_divergence = {self.on_divergence!r}: {advice}); "
                       + last_good_checkpoint(self.checkpoint_path, self.last_good))

    def _describe(self, step: int, flagged: torch.Tensor, params_step: int) -> str:
        def ranks(kind: int) -> str:
            return ", ".join(self.rank_name(r) for r in range(self.world_size) if flagged[r, kind])

        found = []
        if flagged[:, _LOSS].any():
            found.append(f"the loss is not finite on {ranks(_LOSS)}")
        if flagged[:, _GRADIENT].any():
            found.append(f"the {self.gradient_name} is not finite on {ranks(_GRADIENT)}")
        parts = [f"step {step}: " + ", and ".join(found)] if found else []
        if flagged[:, _PARAMETERS].any():
            where = ranks(_PARAMETERS)
            parts.append(f"step {params_step}: its update made the parameters non-finite on {where}" if params_step
                         else f"the parameters are not finite from the start on {where}")
        return "; ".join(parts)
