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

# Purposes, one per stream: every stream of a run is [seed, purpose, ...], and each purpose is used with one number
# of ids only (SeedSequence pads with zeros: [s, p] and [s, p, 0] would be the same stream).
CLIENT_PLAN, PIPELINE_STAGE, SELECTION, NODE_EVAL_SAMPLE, DEVICE_SPEEDS, DEVICE_STATES = 1, 2, 3, 5, 7, 11
TOPOLOGY, BACKOFF_JITTER, ATTACKERS, LOCAL_BASELINE, CENTRAL_BASELINE = 17, 23, 29, 31, 37


def stream(seed: int, purpose: int, *ids: int) -> np.random.Generator:
    """A numpy generator for one purpose (and round, client, ...) of the run seeded `seed`."""
    return np.random.default_rng([seed, purpose, *ids])


def selection_rng(seed: int, round_idx: int) -> np.random.Generator:
    """The stream that selects a round's clients: the same in simulation and over the network."""
    return stream(seed, SELECTION, round_idx)


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
