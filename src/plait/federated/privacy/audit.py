"""Privacy audit: the loss-threshold membership-inference attack of Yeom et al. (CSF 2018).

The attacker guesses "member" for an example whose loss under the released model is below a threshold; by default
the model's mean training loss, which Yeom et al. assume known. The score is the membership advantage TPR − FPR
(0: the attacker learns nothing; 1: perfect). `best_advantage` sweeps every threshold: what an attacker who could
tune the threshold on these very sets would reach, an upper bound for this attack family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from plait.core.flat import FlatSpec, split_views


@torch.inference_mode()
def per_example_loss(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 2000) -> torch.Tensor:
    views = split_views(params, spec)
    parts = [F.cross_entropy(functional_call(model, views, (x[i : i + batch_size],)), y[i : i + batch_size],
                             reduction="none") for i in range(0, len(y), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def loss_threshold_attack(member_losses: torch.Tensor, nonmember_losses: torch.Tensor,
                          threshold: float | None = None) -> dict[str, float]:
    if member_losses.numel() == 0 or nonmember_losses.numel() == 0:
        raise ValueError("membership audit needs at least one member and one non-member example")
    if threshold is None:
        threshold = float(member_losses.mean())
    tpr = float((member_losses <= threshold).float().mean())
    fpr = float((nonmember_losses <= threshold).float().mean())
    # best threshold: sort all losses, sweep; advantage at each cut = members below − non-members below (as rates)
    losses = torch.cat([member_losses, nonmember_losses])
    is_member = torch.cat([torch.ones_like(member_losses), torch.zeros_like(nonmember_losses)])
    order = losses.argsort()
    members_below = is_member[order].cumsum(0) / member_losses.numel()
    nonmembers_below = (1 - is_member[order]).cumsum(0) / nonmember_losses.numel()
    best = float((members_below - nonmembers_below).max().clamp(min=0))
    return {"threshold": threshold, "tpr": tpr, "fpr": fpr, "advantage": tpr - fpr, "best_advantage": best}


def membership_audit(model: torch.nn.Module, spec: FlatSpec, params: torch.Tensor,
                     members: tuple[torch.Tensor, torch.Tensor], nonmembers: tuple[torch.Tensor, torch.Tensor],
                     threshold: float | None = None) -> dict[str, float]:
    """Attack `params` with equal-sized member (training) and non-member sets (the smaller size is used)."""
    size = min(len(members[1]), len(nonmembers[1]))
    member_losses = per_example_loss(model, spec, params, members[0][:size], members[1][:size])
    nonmember_losses = per_example_loss(model, spec, params, nonmembers[0][:size], nonmembers[1][:size])
    out = loss_threshold_attack(member_losses, nonmember_losses, threshold)
    out.update(member_loss=float(member_losses.mean()), nonmember_loss=float(nonmember_losses.mean()),
               num_examples=size)
    return out
