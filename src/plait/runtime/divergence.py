"""A run that diverged: a non-finite loss, gradient, aggregate, update or model. Every plane raises this one error,
so the command line exits 1 (the run started and failed) whichever plane stopped."""

from __future__ import annotations

from pathlib import Path


class Diverged(RuntimeError):
    """The run stopped on a non-finite value; the message names where (step or round, rank or client) and the last
    good checkpoint, which is left as it was for `--resume` with other settings."""


def last_good_checkpoint(path: Path, step: int | None, unit: str = "step") -> str:
    """The end of a divergence message: where `--resume` would start."""
    if step is None:
        return "no checkpoint was written before it: nothing to resume"
    return f"the last good checkpoint is {path} ({unit} {step}); --resume starts from it"
