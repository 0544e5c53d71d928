"""ZeRO-2 (`sync.shard_gradients`) on real gloo ranks: the same weights as plain data parallel after a few steps (SGD
with momentum, Adam; accumulation; buckets that cross the slices' borders; synced during backward or after it),
each rank holding only its slice of the gradient between steps, and the ring's reduce-scatter phase on its own
leaving chunk r summed on rank r."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait.core.models import mnist_2nn
from plait.parallel.collectives import RingAllReduce
from plait.parallel.config import CommHookSection, CompressionSection, DataParallelRunConfig, SyncSection
from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory

OPTIMIZERS = {"sgd_momentum": optimizer_factory("sgd", lr=0.1, momentum=0.9),
              "adam": optimizer_factory("adam", lr=0.01)}
ZERO2 = {"shard_optimizer": True, "shard_gradients": True}
WAYS = {"plain": {}, "zero2": ZERO2, "zero2_after_backward": {**ZERO2, "overlap": False}}


def _model() -> nn.Module:
    torch.manual_seed(3)
    return mnist_2nn(hidden=24)


def _train_rank(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 2, 2, 8, 1, 28, 28, generator=gen), torch.randint(0, 10, (6, 2, 2, 8), generator=gen)
    out: dict = {}
    for name, optimizer in OPTIMIZERS.items():
        for way, kwargs in WAYS.items():
            # 1 KiB buckets: three, two inside rank 1's slice (rank 0's piece empty), one across the border
            dp = DataParallel(_model(), dims, optimizer=optimizer, bucket_bytes=1024, **kwargs)
            dp.broadcast_params()
            for step in range(1, 6):  # two micro-batches per step: accumulation, then one sync
                dp.train_step([(x[step, rank, k], y[step, rank, k]) for k in range(2)], step)
            out[(name, way)] = dp.full_params().detach().numpy().copy()
            if way == "zero2":
                sync = dp.grad_sync
                out[(name, "whole_grads")] = [p.grad is not None for p in dp.params]
                out[(name, "grad_numel")] = sync.grad.numel()
                out[(name, "grad_bytes")] = sync.grad_bytes()
                out[(name, "slice")] = dp.zero.hi - dp.zero.lo
                out[(name, "buckets")] = len(sync.buckets)
            out["numel"] = dp.num_params
            dp.close()
    return out


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return spawn_ranks(_train_rank, 2, backend="gloo", timeout_s=240)


@pytest.mark.parametrize("way", ["zero2", "zero2_after_backward"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_zero2_trains_to_the_weights_of_plain_data_parallel(trained, optimizer, way):
    for out in trained:
        np.testing.assert_allclose(out[(optimizer, way)], out[(optimizer, "plain")], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trained[0][(optimizer, way)], trained[1][(optimizer, way)])


def test_each_rank_keeps_only_its_slice_of_the_gradient(trained):
    numel = trained[0]["numel"]
    for out in trained:
        assert not any(out[("adam", "whole_grads")])  # every parameter's whole gradient was dropped
        assert out[("adam", "grad_numel")] == out[("adam", "slice")]
        assert out[("adam", "grad_bytes")] == 4 * out[("adam", "slice")]  # fp32, the slice and nothing else
        assert out[("adam", "buckets")] > 2
    assert sum(out[("adam", "grad_numel")] for out in trained) == numel
    assert max(out[("adam", "grad_numel")] for out in trained) == (numel + 1) // 2


def _reduce_scatter_rank(rank: int, world_size: int) -> list[list[float]]:
    ParallelDims(world_size=world_size).build()
    sizes = [3, 0, 2]  # uneven, one rank's chunk empty
    flat = torch.arange(sum(sizes), dtype=torch.float32) * (rank + 1)
    ring = RingAllReduce(dist.group.WORLD)
    ring.reduce_scatter(list(flat.split(sizes)))
    return [chunk.tolist() for chunk in flat.split(sizes)]


def test_ring_reduce_scatter_leaves_each_chunk_summed_on_its_rank():
    results = spawn_ranks(_reduce_scatter_rank, 3, backend="gloo", timeout_s=120)
    total = (torch.arange(5, dtype=torch.float32) * 6).split([3, 0, 2])  # ranks multiply by 1 + 2 + 3
    for rank, chunks in enumerate(results):
        assert chunks[rank] == total[rank].tolist()


def test_shard_gradients_needs_shard_optimizer():
    with pytest.raises(ValueError, match="sync.shard_gradients"):
        SyncSection(shard_gradients=True)
    assert SyncSection(shard_optimizer=True, shard_gradients=True).shard_gradients


def test_shard_gradients_refuses_compression_and_hooks():
    zero2 = SyncSection(shard_optimizer=True, shard_gradients=True)
    with pytest.raises(ValueError, match="sync.shard_gradients.*compression.codec = 'topk'"):
        DataParallelRunConfig(sync=zero2, compression=CompressionSection(codec="topk"))
    with pytest.raises(ValueError, match="sync.shard_gradients.*comm_hook.name = 'powersgd'"):
        DataParallelRunConfig(sync=zero2, comm_hook=CommHookSection(name="powersgd"))
