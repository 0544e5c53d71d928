"""Per-round privacy bookkeeping, for the one round loop (simulation and network alike).

It fixes central DP's inputs once (the expected clients per round, the fixed denominator), wraps a round's
aggregator in central DP, counts released rounds with the sampling rate each one really had (selected over the
eligible clients that could be selected: in a network run, those connected), moves the adaptive clip norm, and says
when one more release would overspend the ε budget. Its state (`dp_rounds`, `dp_rates`, `dp_clip_norm`) rides in
the server optimizer's state dict, so checkpoints keep it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from plait.federated.privacy.accounting import epsilon_after, epsilon_of_rates
from plait.federated.privacy.central import CentralDPAggregator, delta_noise_multiplier
from plait.federated.seeds import noise_generator
from plait.federated.selection import share_of, target_clients

if TYPE_CHECKING:
    from plait.federated.config import FLConfig

SERVER_NOISE_STAGE = 2  # stage index in plait.federated.seeds.stage_seed (1: local DP, 3: attackers)


def _check_expected(expected: int, target: int, num_clients: int) -> None:
    """privacy.expected_clients divides every round's noised sum: more than the clients there are is an error (no
    round could reach it), and one far from the rounds' target (beyond 2x either way) is said, as it scales each
    round's mean by about target / expected (the privacy stays as accounted; the training does not)."""
    if expected > num_clients:
        raise ValueError(f"fl.privacy.expected_clients = {expected} is more than the {num_clients} clients there are: "
                         "no round reaches it, and every round's mean would be shrunk by it (0: the round's target)")
    if not target / 2 <= expected <= 2 * target:
        warnings.warn(f"fl.privacy.expected_clients = {expected} is far from the rounds' target of {target} clients: "
                      f"each round's noised sum is divided by {expected}, which scales its mean by about "
                      f"{target / expected:.2g}x (0: the target; the privacy accounted is the same either way)",
                      stacklevel=3)


class RoundPrivacy:
    def __init__(self, fl: FLConfig, seed: int, num_clients: int):
        self.config, self.seed = fl.privacy, seed
        target = min(target_clients(fl.fraction, fl.min_clients, num_clients), num_clients)
        self.expected_clients = self.config.expected_clients or target  # central DP's fixed denominator
        if self.config.mode == "central" and self.config.expected_clients:
            _check_expected(self.config.expected_clients, target, num_clients)
        # The configured q (the share of all clients sampled, over-selected ones included): only for checkpoints
        # written before each round's own q was kept. A round's real q is passed to `after_release`.
        self.sample_rate = min(1.0, share_of(1 + fl.over_selection, target) / num_clients)
        if self.config.mode == "central" and self.config.adaptive:
            delta_noise_multiplier(self.config.noise_multiplier, self.count_stddev)  # fail at start, naming the key

    @property
    def count_stddev(self) -> float:
        """σ_b, the noise on the released count of unclipped updates (adaptive clipping)."""
        return self.config.clipped_count_stddev or self.expected_clients / 20

    @property
    def enabled(self) -> bool:
        return self.config.mode != "none"

    def init_state(self, opt_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.enabled:
            opt_state["dp_rounds"] = torch.zeros((), dtype=torch.int64)
            opt_state["dp_clip_norm"] = torch.tensor(self.config.clip_norm, dtype=torch.float64)
            opt_state["dp_rates"] = torch.zeros(0, dtype=torch.float64)
        return opt_state

    def rates(self, opt_state: dict[str, torch.Tensor]) -> list[float]:
        """The sampling rate of every released round so far."""
        if "dp_rates" in opt_state:
            return opt_state["dp_rates"].tolist()
        return [self.sample_rate] * int(opt_state["dp_rounds"])  # a checkpoint from before rates were kept

    def epsilon(self, rates: list[float]) -> float:
        """ε at privacy.delta after one released aggregate per entry of `rates`."""
        p = self.config
        if p.mode == "local":  # sensitivity 2C: multiplier z/2; no sampling amplification claimed
            return epsilon_after(len(rates), p.noise_multiplier / 2, 1.0, p.delta)
        return epsilon_of_rates(rates, p.noise_multiplier, p.delta)

    def budget_spent(self, opt_state: dict[str, torch.Tensor], sample_rate: float) -> bool:
        """True when one more round, sampling at `sample_rate`, would take ε past privacy.epsilon_budget."""
        if not self.enabled or not self.config.epsilon_budget:
            return False
        return self.epsilon(self.rates(opt_state) + [sample_rate]) > self.config.epsilon_budget

    def wrap(self, inner, opt_state: dict[str, torch.Tensor], round_idx: int):
        """The round's aggregator: `inner`, wrapped by central DP when it is on."""
        p = self.config
        if p.mode != "central":
            return inner
        generator = noise_generator(self.config.seeded_noise, self.seed, round_idx, 0, SERVER_NOISE_STAGE)
        count_std = self.count_stddev if p.adaptive else None
        return CentralDPAggregator(inner, float(opt_state["dp_clip_norm"]), p.noise_multiplier,
                                   self.expected_clients, generator, count_std)

    def after_release(self, aggregator, opt_state: dict[str, torch.Tensor], record: dict[str, Any],
                      sample_rate: float) -> None:
        """Count the released round at its sampling rate; log and adapt the clip norm."""
        p = self.config
        if self.enabled:
            rates = torch.tensor(self.rates(opt_state) + [sample_rate], dtype=torch.float64)
            opt_state["dp_rounds"], opt_state["dp_rates"] = opt_state["dp_rounds"] + 1, rates
            record["dp_sample_rate"] = sample_rate
        if isinstance(aggregator, CentralDPAggregator):
            record["dp_clip_norm"] = aggregator.clip_norm
            record["dp_unclipped_fraction"] = aggregator.unclipped_fraction
            if p.adaptive:
                opt_state["dp_clip_norm"] = torch.tensor(aggregator.next_clip_norm(p.target_quantile, p.clip_lr),
                                                         dtype=torch.float64)

    def record_epsilon(self, opt_state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        if self.enabled:
            record["epsilon"] = self.epsilon(self.rates(opt_state))
