"""Stop where training diverges, on every rank at once (`train.on_divergence = "stop" | "skip"`).

Every step, once the gradients are synced and before the optimizer steps, each rank flags what it holds that is not
finite: its loss, its gradient after the sync (the aggregate), and its parameters (what the previous step's update
made of them). The flags of all ranks travel in one tiny all-reduce (on a good step, plain data parallel needs
none: see `shared`), so every rank takes the same decision and none is left waiting in a collective:

- "stop": every rank raises `Diverged`, naming the step, the ranks and the last good checkpoint (left as it was, so
  `--resume` can start from it with other settings);
- "skip": the step's update is not applied (the optimizer's state stays as it was) and training goes on. Parameters
  that are already non-finite cannot be repaired by skipping: they stop the run either way.

Before a checkpoint the parameters are checked again, so no checkpoint ever holds a diverged model.

Local SGD's ranks meet only to average, and a per-step collective would undo that: there each rank `note`s, on its
device and without a host sync, the first step where it saw a non-finite value, and the ranks `agree` before each
average and each checkpoint (only "stop" fits: skipping is a per-step decision every rank must share).

A tensor is finite when its sum is: a NaN or Inf anywhere makes the sum non-finite (so does a sum beyond the float
range, itself a sign of divergence), and one reduction per tensor costs far less than the step. The decision is
taken on the host: one host sync per step, the price of stopping where divergence arises, and one small collective
where the ranks' values differ (sharded, parameter server, pipeline stages). Plain data parallel needs none on a
good step: after the sync every rank holds the same gradient and parameters (`shared`).
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


def _sum(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The sum of every element (0 for none): not finite if any element is not."""
    sums = [t.detach().sum().float() for t in tensors if t is not None and t.numel() > 0]
    if len(sums) == 1:  # the flat gradient, the flat parameters, the loss: one reduction, no stack
        return sums[0]
    return torch.stack(sums).sum() if sums else torch.zeros((), device=device)


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
        # per kind, 1 + the step where this rank first saw it (0: not seen), kept on the device until agreed on
        self._noted = torch.zeros(3, dtype=torch.float64, device=device)  # exact step numbers

    def before_update(self, step: int, *, loss: torch.Tensor | None = None,
                      grads: Iterable[torch.Tensor | None] = (), params: Iterable[torch.Tensor] = (),
                      shared: bool = False) -> bool:
        """Collective. True: apply step `step`'s update. False: skip it ("skip"). Raises `Diverged` ("stop").

        `shared`: the gradient and the parameters are the same on every rank (plain data parallel after the
        sync), so every rank takes the same decision from them alone and the ranks meet only when one is not
        finite, to name who saw what: no collective on a good step. (A loss alone then decides nothing: a rank's
        non-finite loss shows in the synced gradient everywhere, and a decision on it would be that rank's alone.)"""
        self.note(step, loss=loss, grads=grads, params=params)
        if shared and not bool(self._noted[_GRADIENT:].any()):  # the step's one host sync
            self._noted.zero_()
            return True
        return self._agree(step)

    def before_checkpoint(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """Collective. Raises `Diverged` if step `step`'s update (or anything noted before) is not finite."""
        self.agree(step, params)

    def note(self, step: int, *, loss: torch.Tensor | None = None, grads: Iterable[torch.Tensor | None] = (),
             params: Iterable[torch.Tensor] = ()) -> None:
        """Local: remember what is not finite at `step` (the parameters: from step − 1's update), without a
        collective or a host sync; the next `agree` (or `before_update`) reports it."""
        sums = torch.stack([_sum([loss], self.device), _sum(grads, self.device), _sum(params, self.device)])
        arisen = torch.tensor([step + 1.0, step + 1.0, step], dtype=torch.float64,
                              device=self.device)  # 1 + the step, as noted
        self._mark(sums, arisen)

    def agree(self, step: int, params: Iterable[torch.Tensor] = ()) -> None:
        """Collective. Raises `Diverged` if any rank noted a non-finite value, or holds non-finite `params` after
        step `step`'s update (local SGD: before averaging, so a diverged replica never spreads to the others)."""
        sums = torch.zeros(3, device=self.device)
        sums[_PARAMETERS] = _sum(params, self.device)
        self._mark(sums, torch.full((3,), step + 1.0, dtype=torch.float64, device=self.device))
        self._agree(step, can_skip=False)

    def saved(self, step: int) -> None:
        """A checkpoint of `step` is on disk: a later divergence names it."""
        self.last_good = step

    def _mark(self, sums: torch.Tensor, arisen: torch.Tensor) -> None:
        """Note 1 + the step of `arisen` for each kind whose sum is not finite, unless one is noted already (the
        first step is where it arose)."""
        self._noted = torch.where(~torch.isfinite(sums) & (self._noted == 0), arisen, self._noted)

    def _agree(self, step: int, can_skip: bool = True) -> bool:
        table = torch.zeros(self.world_size, 3, dtype=torch.float64, device=self.device)
        table[self.rank] = self._noted
        dist.all_reduce(table)  # every rank's notes on every rank: the same decision everywhere
        noted = table.cpu()  # the step's one host sync
        if not bool(noted.any()):
            return True
        self._noted.zero_()
        what = self._describe(noted)
        repairable = not bool(noted[:, _PARAMETERS].any())
        if self.on_divergence == "skip" and repairable and can_skip:
            self.skipped[step] = what
            return False
        advice = ("lower train.lr, or set it to 'skip'" if self.on_divergence == "stop"
                  else "skipping cannot repair the parameters" if not repairable
                  else "only a step every rank checks before its update can be skipped")
        raise Diverged(f"{what} (train.on_divergence = {self.on_divergence!r}: {advice}); "
                       + last_good_checkpoint(self.checkpoint_path, self.last_good))

    def _describe(self, noted: torch.Tensor) -> str:
        """'step 3: the loss is not finite on rank 1, and ...; step 4: ...' in the order things arose."""
        found: dict[tuple[int, int], list[str]] = {}  # (step, kind) -> ranks
        for rank in range(self.world_size):
            for kind in range(3):
                if noted[rank, kind]:
                    found.setdefault((int(noted[rank, kind]) - 1, kind), []).append(self.rank_name(rank))
        by_step: dict[int, list[str]] = {}
        for (step, kind), ranks in sorted(found.items()):
            where = ", ".join(ranks)
            if kind == _LOSS:
                by_step.setdefault(step, []).append(f"the loss is not finite on {where}")
            elif kind == _GRADIENT:
                by_step.setdefault(step, []).append(f"the {self.gradient_name} is not finite on {where}")
            elif step > 0:
                by_step.setdefault(step, []).append(f"its update made the parameters non-finite on {where}")
            else:
                by_step.setdefault(step, []).append(f"the parameters are not finite from the start on {where}")
        return "; ".join(f"step {step}: " + ", and ".join(parts) if step > 0 else ", and ".join(parts)
                         for step, parts in by_step.items())
