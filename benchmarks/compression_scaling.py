"""Bytes per rank and step time of gradient sync as ranks grow: uncompressed ring all-reduce vs fp16 on the wire
vs top-k (all-gathered, as `[compression]` does, and on shared indices, the `topk` hook) vs PowerSGD.

    .venv/bin/python benchmarks/compression_scaling.py [--quick] [--ranks 2 4 8]

Each world size is one spawn of gloo ranks on 127.0.0.1 (1 thread each). The gradient is the MNIST CNN's
(1,663,370 floats in its real parameter shapes, 4 MiB buckets), filled with fresh seeded random numbers every step;
each rank syncs it through `GradSync` exactly as `DataParallel` does after backward, with Plait's own ring
all-reduce under every hook (so every byte is counted on the wire, not estimated):
- `ring`: uncompressed mean (the reference);
- `fp16`: the CastHook, 16-bit values summed by the ring;
- `topk_allgather`: the `[compression] codec = "topk"` path (1% of entries + int32 indices, error feedback),
  all-gathered: each rank receives every other rank's payload;
- `topk_shared`: the `topk` hook (1%, indices of a rotating leader, values summed by the ring);
- `powersgd`: the PowerSGD hook, rank 4, error feedback, warm start (no warm-up steps here).
Time per step is the slowest rank's median (sync plus compression compute). With more ranks than cores (4 and 8
ranks on a 2-core machine) ranks take turns on the CPUs, so times grow for reasons that are not the network;
bytes are exact whatever the load. The last line is the headline JSON: PowerSGD's bytes per rank against the
uncompressed ring at the largest world size.
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

from plait.core.compress import TopKCodec
from plait.core.models import build_model
from plait.parallel.collectives import make_allreduce
from plait.parallel.comm_hooks import CastHook
from plait.parallel.compression import GradCompressor
from plait.parallel.grad_sync import GradSync
from plait.parallel.launch import spawn_ranks
from plait.parallel.powersgd import PowerSGDHook
from plait.parallel.topk_hook import SharedTopKHook

METHODS = ("ring", "fp16", "topk_allgather", "topk_shared", "powersgd")
RATIO, RANK, BUCKET_BYTES = 0.01, 4, 4 << 20


def _sync_for(method: str, params, rank: int) -> GradSync:
    allreduce = make_allreduce("ring")
    if method == "ring":
        return GradSync(params, allreduce, bucket_bytes=BUCKET_BYTES)
    if method == "topk_allgather":
        compressor = GradCompressor(TopKCodec(ratio=RATIO, seed=rank), error_feedback=True)
        return GradSync(params, allreduce, bucket_bytes=BUCKET_BYTES, op="compressed", compressor=compressor)
    hook = {"fp16": lambda: CastHook(torch.float16), "topk_shared": lambda: SharedTopKHook(ratio=RATIO),
            "powersgd": lambda: PowerSGDHook(rank=RANK, start_step=0)}[method]()
    return GradSync(params, allreduce, bucket_bytes=BUCKET_BYTES, op="hook", comm_hook=hook)


def _rank(rank: int, world_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    params = [p for p in build_model("cnn").parameters()]
    out = {}
    for method in METHODS:
        sync = _sync_for(method, params, rank)
        gen = torch.Generator().manual_seed(rank)
        times, sent = [], []
        for step in range(steps + 1):  # step 0 warms up (first Q, residual buffers, scratch buffers)
            sync.reset()
            sync.flat_grad.normal_(generator=gen)
            before = sync.stats.bytes_sent
            dist.barrier()
            start = time.perf_counter()
            sync.finish()
            elapsed = time.perf_counter() - start
            if step:
                times.append(elapsed)
                sent.append(sync.stats.bytes_sent - before)
        out[method] = {"bytes": statistics.median(sent), "seconds": statistics.median(times)}
        sync.close()
        sync.allreduce.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 timed steps per method (else 20)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    steps = 5 if args.quick else 20
    numel = sum(p.numel() for p in build_model("cnn").parameters())
    table: dict[int, dict] = {}
    for n in args.ranks:
        results = spawn_ranks(_rank, n, steps, backend="gloo", timeout_s=900)
        table[n] = {m: {"bytes": int(results[0][m]["bytes"]),
                        "ms": round(1000 * max(r[m]["seconds"] for r in results), 2)} for m in METHODS}
        print(json.dumps({"ranks": n, **table[n]}), flush=True)
    print(f"\nbytes sent per rank per step (CNN gradient, {numel:,} floats = {4 * numel / 2**20:.2f} MiB fp32)")
    print("method".ljust(16) + "".join(f"{n} ranks".rjust(24) for n in args.ranks))
    for m in METHODS:
        cells = "".join(f"{table[n][m]['bytes']:>12,} {table[n][m]['ms']:>8.1f} ms".rjust(24) for n in args.ranks)
        print(m.ljust(16) + cells)
    largest = max(args.ranks)
    growth = {m: round(table[largest][m]["bytes"] / table[min(args.ranks)][m]["bytes"], 2) for m in METHODS}
    print(f"bytes growth {min(args.ranks)} -> {largest} ranks: {growth}")
    plait, reference = table[largest]["powersgd"]["bytes"], table[largest]["ring"]["bytes"]
    print(json.dumps({"benchmark": "compression_scaling",
                      "metric": f"bytes sent per rank per step at {largest} ranks, PowerSGD (rank {RANK}) vs "
                                "uncompressed ring all-reduce, CNN gradient",
                      "plait": plait, "reference": reference, "ratio": round(plait / reference, 4),
                      "goal": "bytes per rank flat as ranks grow (within the ring's own 2(n-1)/n) and below the "
                              "uncompressed ring; all-gathered top-k grows with n",
                      "growth": growth, "step_ms": {m: table[largest][m]["ms"] for m in METHODS}}))


if __name__ == "__main__":
    main()
