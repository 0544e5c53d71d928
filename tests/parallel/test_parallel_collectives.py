"""Ring, tree and naive all-reduce against the backend's own, on real spawned ranks (gloo on 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.parallel.collectives import make_allreduce
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks

ALGOS = ("ring", "ring_segmented", "tree", "naive")
# 840 is divisible by 2..5 (exact byte theory); the others are awkward: smaller than n, prime, odd.
SIZES = (1, 2, 3, 7, 840, 1001, 12347)


def _check_rank(rank: int, world_size: int, group_sizes: tuple[int, ...]) -> dict:
    """Checks on groups of the first n ranks for each n: one spawn covers several world sizes (and subgroups,
    whose group ranks differ from global ones only in general, so p2p must translate them)."""
    ParallelDims(world_size=world_size).build()
    out = {}
    for n in group_sizes:
        group = dist.new_group(list(range(n)))  # collective: every rank creates every group
        if rank < n:
            out[n] = _check_group(rank, group)
    return out


def _check_group(rank: int, group) -> dict:
    out = {}
    for size in SIZES:
        gen = torch.Generator().manual_seed(1000 * rank + size)
        x_int = torch.randint(-1000, 1000, (size,), generator=gen).float()  # sums exact in any order
        x_rand = torch.randn(size, generator=gen)
        ref_int, ref_rand = x_int.clone(), x_rand.clone()
        dist.all_reduce(ref_int, group=group)
        dist.all_reduce(ref_rand, group=group)
        for name in ALGOS:
            ar = make_allreduce(name.removesuffix("_segmented"), group)
            if name == "ring_segmented":  # tiny segments: the multi-segment path, with a ragged last segment
                ar.segment_numel = 3
            y_int, y_rand, y_async = x_int.clone(), x_rand.clone(), x_rand.clone()
            ar.all_reduce(y_int)
            before = ar.stats.bytes_sent
            ar.all_reduce(y_rand)
            one_call = (ar.stats.bytes_sent - before, )
            recv_before = ar.stats.bytes_recv
            handle = ar.all_reduce_async(y_async, then=lambda t=y_async: t.mul_(2))
            handle.wait()
            ar.close()
            out[(name, size)] = {
                "int_equal": torch.equal(y_int, ref_int),
                "rand_err": float((y_rand - ref_rand).abs().max()),
                "async_err": float((y_async - 2 * y_rand).abs().max()),
                "bits": y_rand.numpy(),
                "sent": one_call[0],
                "recv": ar.stats.bytes_recv - recv_before,
            }
    return out


def _assert_world(results: list[dict], world_size: int) -> None:
    n = world_size
    for (name, size), first in results[0].items():
        S = 4 * size
        for rank, res in enumerate(results):
            r = res[(name, size)]
            assert r["int_equal"], f"{name} n={n} size={size} rank={rank}: differs from native"
            assert r["rand_err"] <= 1e-5 * max(1.0, size ** 0.5), (name, n, size, rank, r["rand_err"])
            assert r["async_err"] == 0.0, (name, n, size, rank)
            # replicas must not drift: every rank holds the same bits
            assert (r["bits"] == first["bits"]).all(), f"{name} n={n} size={size}: ranks disagree"
        sent = [res[(name, size)]["sent"] for res in results]
        if name == "naive":
            assert sent == [(n - 1) * S] * n
        elif name.startswith("ring"):
            if size % n == 0:
                assert sent == [2 * (n - 1) * S // n] * n, (n, size, sent)
            else:  # chunks differ by one element: each step's chunk is within one float of S/n
                for s in sent:
                    assert abs(s - 2 * (n - 1) * S / n) <= 2 * (n - 1) * 4, (n, size, sent)
            assert sum(sent) == sum(res[(name, size)]["recv"] for res in results)
        else:  # tree: every edge carries S up and S down
            assert sum(sent) == 2 * (n - 1) * S, (n, size, sent)
            assert sent[0] == S * min(2, n - 1)


def test_p2p_allreduce_equals_native_for_2_3_4_ranks():
    results = spawn_ranks(_check_rank, 4, (2, 3, 4), timeout_s=120)
    for n in (2, 3, 4):
        _assert_world([res[n] for res in results[:n]], n)
        assert all(n not in res for res in results[n:])


@pytest.mark.slow
def test_p2p_allreduce_equals_native_five_ranks():
    results = spawn_ranks(_check_rank, 5, (5,), timeout_s=120)
    _assert_world([res[5] for res in results], 5)


def test_parallel_dims_validates_layout():
    assert ParallelDims(world_size=6, pp=2).dp == 3
    assert ParallelDims(world_size=6, pp=2).dp_ranks(1) == [1, 3, 5]
    assert ParallelDims(world_size=6, pp=2).pp_ranks(3) == [2, 3]
    with pytest.raises(ValueError, match="parallel.pp"):
        ParallelDims(world_size=4, pp=3)
    with pytest.raises(ValueError, match="parallel.dp"):
        ParallelDims(world_size=4, dp=3, pp=1)
    with pytest.raises(ValueError, match="allreduce"):
        make_allreduce("butterfly")


def _sum_and_raise(rank: int, world_size: int, fail: bool) -> torch.Tensor:
    total = torch.full((3,), float(rank + 1))
    dist.all_reduce(total)
    if fail and rank == 1:
        raise ValueError("train.batch_size = 9 does not fit")
    return total


def test_ranks_return_tensors_and_a_ranks_setting_error_is_told_apart():
    from plait.parallel.launch import RankFailed

    results = spawn_ranks(_sum_and_raise, 2, False, timeout_s=120)
    assert [r.tolist() for r in results] == [[3.0, 3.0, 3.0]] * 2  # by value: the ranks are gone when read
    with pytest.raises(RankFailed) as failed:
        spawn_ranks(_sum_and_raise, 2, True, timeout_s=120)
    error = failed.value
    assert (error.setting, error.rank, error.message) == (True, 1, "train.batch_size = 9 does not fit")
    assert "Traceback" in str(failed.value)  # the rank's traceback, for a failure that is not a setting's
