"""Every seed of a federated run, derived from (run seed, purpose, round, client, ...).

The purpose tag comes first so that two derivations never collide (numpy's SeedSequence pads entropy with zeros,
so [s, r, c] and [s, r, c, 0] would be the same stream). Randomness never depends on the order in which clients
report, so a resumed run repeats the uninterrupted one.

Privacy noise is the exception: noise anyone can regenerate from the config protects nothing, so it comes from the
operating system's entropy unless `privacy.seeded_noise` asks for reproducible noise in an experiment.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

CLIENT_PLAN, PIPELINE_STAGE, SELECTION = 1, 2, 3  # purposes (selection: np.random.default_rng([seed, 3, round]))


def derive_seed(seed: int, purpose: int, *ids: int) -> int:
    return int(np.random.SeedSequence([seed, purpose, *ids]).generate_state(1)[0])


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """The seed of one client's training plan in one round (local shuffling)."""
    return derive_seed(seed, CLIENT_PLAN, round_idx, client)


def stage_seed(seed: int, round_idx: int, client: int, stage: int) -> int:
    """A seed per (run, round, client, pipeline stage): codecs' sampling, simulated attackers."""
    return derive_seed(seed, PIPELINE_STAGE, round_idx, client, stage)


def noise_generator(seeded: bool, seed: int, round_idx: int, client: int, stage: int) -> torch.Generator:
    """The generator for DP noise: from OS entropy, or (experiments only) from the run's seed."""
    value = stage_seed(seed, round_idx, client, stage) if seeded else secrets.randbits(63)
    return torch.Generator().manual_seed(value)
