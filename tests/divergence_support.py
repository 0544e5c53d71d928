"""A NaN injected into a data-parallel run where a config can reach it: a communication hook, named in the config as
"divergence_support:NaNGradientHook", that writes NaN into one rank's gradient at one step, then syncs as usual.
The rank and step come from the environment (the trainer builds a hook without arguments; spawned ranks inherit it)."""

from __future__ import annotations

import os

from plait.parallel.collectives import Handle
from plait.parallel.comm_hooks import GradBucket, allreduce_hook

STEP_VARIABLE, RANK_VARIABLE = "PLAIT_TEST_NAN_STEP", "PLAIT_TEST_NAN_RANK"


class NaNGradientHook:
    def __init__(self) -> None:
        self.step = int(os.environ[STEP_VARIABLE])
        self.rank = int(os.environ[RANK_VARIABLE])
        self.steps_seen = 0

    def __call__(self, bucket: GradBucket) -> Handle:
        if bucket.index == 0:  # the first bucket of each step (buckets start in index order)
            self.steps_seen += 1
        if self.steps_seen == self.step and bucket.allreduce.rank == self.rank:
            bucket.buffer.fill_(float("nan"))
        return allreduce_hook(bucket)
