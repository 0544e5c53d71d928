"""Simulated clients spread over `torch.distributed` ranks (one machine or many, gloo or NCCL): the simulator past
one machine.

Every rank runs the same round loop with the same seeds, so every rank makes the same decisions (selection, who a
deadline drops). Each rank trains its share of the round's kept clients (every `world`-th), the raw updates are
all-gathered, and every rank then runs the rest of the client program (attack simulation, local DP, compression
with each client's error feedback) and the aggregation over all of them in client order: the result is the
sequential simulator's whatever the number of ranks, and every rank holds the same state. Only rank 0 writes the
run directory. Start it with `torchrun --nproc-per-node N -m plait.cli run CONFIG` and `fl.executor =
"distributed"`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from plait.federated.backends.simulated import SimulatedBackend
from plait.federated.client_update import Update
from plait.federated.round_loop import Evaluation, RoundTasks


class DistributedBackend(SimulatedBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not dist.is_initialized():
            raise ValueError("fl.executor = 'distributed' runs under torch.distributed: start it with "
                             "torchrun --nproc-per-node N -m plait.cli run CONFIG")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _gather(self, mine: list) -> list:
        everyone: list[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(everyone, mine)
        return [item for part in everyone for item in part]

    def train(self, kept: list[int], tasks: RoundTasks) -> Iterator[tuple[int, Update]]:
        mine = [(cid, _portable(update)) for cid, update in super().train(kept[self.rank::self.world], tasks)]
        yield from sorted(self._gather(mine), key=lambda item: item[0])

    def evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> list[Evaluation]:
        mine = super().evaluate(params, client_ids[self.rank::self.world], round_idx)
        return sorted(self._gather(mine), key=lambda e: e.client_id)


def _portable(update: Update) -> Update:
    """An update that pickles by value (all_gather_object), on the CPU."""
    buffers = update.local_buffers.cpu() if update.local_buffers is not None else None
    return Update(update.delta.detach().cpu(), update.num_examples, dict(update.metrics), buffers)
