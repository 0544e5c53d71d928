"""Secure aggregation (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020): the server learns only the sum.

`SecAggClient` and `SecAggServer` are the two halves of the protocol (state machines over `Stage`) and exchange
only the dataclasses of `messages`; `SecureAggregator` runs both in-process behind the strategy's `Aggregator`
interface. See docs/secure_aggregation.md.

`SecAggConfig` imports without `cryptography` (so configs load anywhere); the protocol itself needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from plait.federated.secagg.config import SecAggConfig

_LAZY = {"SecureAggregator": "aggregator", "SecAggClient": "client", "SecAggServer": "server",
         "SecureSum": "server", "SecAggError": "protocol", "Stage": "protocol"}

__all__ = ["SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "SecureAggregator", "SecureSum", "Stage"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"plait.federated.secagg.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'plait.federated.secagg' has no attribute {name!r}")
