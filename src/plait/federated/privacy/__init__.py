"""Differential privacy for federated learning: central DP-FedAvg (fixed or adaptive clipping), local DP,
privacy accounting with dp-accounting's RDP accountant, and a membership-inference audit."""

from plait.federated.privacy.accounting import epsilon_after, rounds_within_budget
from plait.federated.privacy.central import CentralDPAggregator, update_clip_norm
from plait.federated.privacy.config import PrivacyConfig
from plait.federated.privacy.local import LocalDP

__all__ = ["CentralDPAggregator", "LocalDP", "PrivacyConfig", "epsilon_after", "rounds_within_budget",
           "update_clip_norm"]
