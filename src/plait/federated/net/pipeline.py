"""The update pipeline over the network, built from the simulator's own pieces.

Client process: `ClientStages.encode` (clip + local-DP noise, compression with error feedback kept in the client's
memory across rounds), then the codec's tensors travel as named parts (`wire.py`). Server: `ClientStages.decode`,
then the strategy's aggregator wrapped in central DP and the ε accounting of `plait.federated.privacy.rounds`, the
same objects the simulator uses. Randomness is seeded per (run, round, client, stage) as in the simulator.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from plait.federated.config import FLConfig


def pipeline_fingerprint(fl: FLConfig) -> str:
    """What client and server must agree on for an update to be read right: canonical JSON of the client stages."""
    s, p = fl.strategy, fl.privacy
    stages: dict[str, Any] = {"strategy": s.name, "weighting": s.weighting, "compression": asdict(fl.compression),
                              "privacy": {"mode": p.mode}}
    if s.name == "secagg":
        stages["secagg"] = asdict(s.secagg)
    if p.mode == "local":
        stages["privacy"].update(clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier)
    return json.dumps(stages, sort_keys=True, separators=(",", ":"))
