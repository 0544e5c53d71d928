"""A data-parallel run whose rank 0 came back on another node: rank 0 alone writes the run directory, so after
torchrun placed it elsewhere its node may hold no checkpoint, or an older one, while another rank's node holds the
latest. Before the run resumes, the rank whose node holds the latest checkpoint sends it to rank 0 with the records
that go with it; the run never starts over in silence because the files were on another machine."""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.experiment.rundir import RunDir
from plait.parallel.device import rank_device
from plait.parallel.file_transfer import transfer_file
from plait.runtime.checkpoint import load_checkpoint

NONE = -1  # a rank without a readable checkpoint


def bring_latest_checkpoint_to_rank0(run: RunDir) -> int | None:
    """Collective: every rank says the step of the checkpoint its node holds; the lowest rank with the latest one
    sends it, the config and the records to rank 0 when rank 0's is missing or older. Returns the sending rank, or
    None when nothing moved."""
    step = NONE
    if run.checkpoint_path.exists():
        try:
            step = int(load_checkpoint(run.checkpoint_path)["step"])
        except Exception:  # an unreadable file is no checkpoint to resume from
            step = NONE
    steps = torch.full((dist.get_world_size(),), NONE, dtype=torch.int64, device=rank_device())
    steps[dist.get_rank()] = step
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # each rank filled its own slot; the others stay at NONE
    latest = int(steps.max())
    if latest == NONE or int(steps[0]) == latest:
        return None
    src = int((steps == latest).nonzero()[0])
    if dist.get_rank() in (src, 0):
        for path in (run.checkpoint_path, run.config_path, run.metrics_path, run.path / "metrics.csv"):
            transfer_file(path, src, 0)
    if dist.get_rank() == 0:
        print(f"note: rank 0's node holds {'no checkpoint' if int(steps[0]) == NONE else 'an older checkpoint'}; "
              f"rank {src}'s node holds the latest (step {latest}) and sent it with the run's records",
              flush=True)
    return src
