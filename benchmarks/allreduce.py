"""Bus bandwidth of Plait's ring, tree and naive all-reduce vs gloo's own all-reduce and vs raw send/recv.

    .venv/bin/python benchmarks/allreduce.py [--quick] [--nproc 2]

Everything is measured in the same run, on the same spawned ranks (gloo, 127.0.0.1, 1 thread each):
- p2p: one-way send/recv bandwidth, rank 0 → rank 1, S bytes per message;
- duplex: ranks 0 and 1 send S/2 to each other at the same time (S bytes in all, as in a 2-rank ring step pair);
- swap: ranks 0 and 1 send S to each other at the same time (2S bytes in all: what a 2-rank ring moves). Its time
  over p2p's time says whether the two directions share one budget (≈ 2: copies on the CPUs, the ring is bounded
  by ≈ 0.5× p2p) or have one each (≈ 1: full duplex, as separate NICs give). CPU seconds (all threads, both ranks)
  are kept for p2p and swap so the reading does not rest on wall time alone;
- native: dist.all_reduce; ring / tree / naive: plait.parallel.collectives.
Bus bandwidth (as nccl-tests define it) = 2(n−1)/n · S / time, so an all-reduce that moves its bytes as fast as a
link allows scores the link's bandwidth. The median of several repetitions is kept.
Goal: ring ≥ 1.0× native and ≥ 0.8× p2p at ≥ 1e6 floats. The last line is the headline JSON (ring vs native
at the largest size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.distributed as dist

from plait.parallel.collectives import make_allreduce
from plait.parallel.launch import spawn_ranks


def _once(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_size(rank: int, world_size: int, size: int, reps: int) -> dict:
    """Every variant at one message size, on this rank."""
    x = torch.randn(size)
    nbytes = size * 4

    def p2p() -> None:
        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(x, 0)

    half = size // 2
    incoming = torch.empty(half)

    def duplex() -> None:  # both ranks send S/2 to each other at once: S bytes cross the loopback in all
        if rank < 2:
            peer = 1 - rank
            works = [dist.isend(x[:half], peer), dist.irecv(incoming, peer)]
            for work in works:
                work.wait()

    everything = torch.empty(size)

    def swap() -> None:  # both ranks send S to each other at once: 2S bytes in all, as a 2-rank ring moves
        if rank < 2:
            peer = 1 - rank
            works = [dist.isend(x, peer), dist.irecv(everything, peer)]
            for work in works:
                work.wait()

    ops = {"p2p": p2p, "duplex": duplex, "swap": swap}
    for name in ("native", "ring", "tree", "naive"):
        ar, buf = make_allreduce(name), x.clone()
        ops[name] = lambda ar=ar, buf=buf: ar.all_reduce(buf)
    times: dict[str, list[float]] = {name: [] for name in ops}
    cpu: dict[str, list[float]] = {name: [] for name in ops}
    for fn in ops.values():
        _once(fn)  # warm-up: connections, receive buffers
    for _ in range(reps):  # round-robin, so every variant sees the same background load
        for name, fn in ops.items():
            before = time.process_time()  # this rank's CPU time, every thread (gloo's I/O thread included)
            times[name].append(_once(fn))
            cpu[name].append(time.process_time() - before)
    # each repetition counts as long as its slowest rank took
    table = torch.tensor([times[name] for name in ops], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    medians = {name: statistics.median(row) for name, row in zip(ops, table.tolist())}
    cpu_table = torch.tensor([cpu[name] for name in ops], dtype=torch.float64)
    dist.all_reduce(cpu_table)  # CPU seconds of all ranks together
    bus = 2 * (world_size - 1) / world_size * nbytes
    moved = {"p2p": nbytes, "duplex": nbytes, "swap": 2 * nbytes}
    result = {name: moved.get(name, bus) / seconds for name, seconds in medians.items()}
    result["swap_over_p2p_time"] = medians["swap"] / medians["p2p"]
    cpu_med = {name: statistics.median(row) for name, row in zip(ops, cpu_table.tolist())}
    result["swap_over_p2p_cpu"] = cpu_med["swap"] / cpu_med["p2p"]
    return result


def _bench_rank(rank: int, world_size: int, sizes: list[int], reps: int) -> dict:
    return {size: _bench_size(rank, world_size, size, reps) for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    sizes = [100_000, 1_000_000, 10_000_000] if args.quick else [100_000, 1_000_000, 5_000_000, 10_000_000, 25_000_000]
    reps = 7 if args.quick else 15
    results = spawn_ranks(_bench_rank, args.nproc, sizes, reps, timeout_s=1200)[0]
    print(f"{'floats':>10} {'p2p GB/s':>9} {'duplex':>8} {'swap':>8} {'native':>8} {'ring':>8} {'tree':>8} "
          f"{'naive':>8}  ring/native ring/p2p swap/p2p time, cpu")
    lines = []
    for size in sizes:
        r = results[size]
        print(f"{size:>10.1e} {r['p2p'] / 1e9:>9.2f} {r['duplex'] / 1e9:>8.2f} {r['swap'] / 1e9:>8.2f} "
              f"{r['native'] / 1e9:>8.2f} {r['ring'] / 1e9:>8.2f} {r['tree'] / 1e9:>8.2f} {r['naive'] / 1e9:>8.2f}  "
              f"{r['ring'] / r['native']:>11.2f} {r['ring'] / r['p2p']:>8.2f} "
              f"{r['swap_over_p2p_time']:>13.2f}, {r['swap_over_p2p_cpu']:.2f}")
        for name in ("ring", "tree", "naive"):
            lines.append({"benchmark": "allreduce", "metric": f"{name}_busbw_vs_native_GBps@{size:.1e}",
                          "plait": round(r[name] / 1e9, 3), "reference": round(r["native"] / 1e9, 3),
                          "ratio": round(r[name] / r["native"], 3), "goal": 1.0 if name == "ring" else None})
        lines.append({"benchmark": "allreduce", "metric": f"ring_busbw_vs_p2p_GBps@{size:.1e}",
                      "plait": round(r["ring"] / 1e9, 3), "reference": round(r["p2p"] / 1e9, 3),
                      "ratio": round(r["ring"] / r["p2p"], 3), "goal": 0.8})
    big = sizes[-1]
    headline = {"benchmark": "allreduce", "metric": f"ring_busbw_vs_native_GBps@{big:.1e}",
                "plait": round(results[big]["ring"] / 1e9, 3), "reference": round(results[big]["native"] / 1e9, 3),
                "ratio": round(results[big]["ring"] / results[big]["native"], 3), "goal": 1.0}
    for line in lines:
        print(json.dumps(line))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
