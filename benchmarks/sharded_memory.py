"""Memory per rank and step time: plain data parallel vs ZeRO-1 (`sync.shard_optimizer`) vs ZeRO-2 (and
`sync.shard_gradients`) vs FSDP2 (`sync.kind = "sharded"`) vs `DistributedDataParallel`, Adam, on spawned gloo
ranks.

    .venv/bin/python benchmarks/sharded_memory.py [--quick] [--nproc 2]

The model is a deep MLP (8 Linear layers of width 2048 by default: 29.4M parameters, 112 MiB in fp32) trained on
random batches of 32. For each way, per rank:
- `state_mib`: bytes of the training state this rank holds after a step (parameters, gradients, optimizer state;
  local shards only), counted from the tensors themselves: exact;
- `peak_rss_mib`: the process's peak resident memory growth over the run (from `getrusage`, measured: includes
  transient buffers such as FSDP's unsharded layer and the all-gather buffers; the first way run in a process pays
  the allocator's warm-up, so each way runs in its own spawn);
- `step_ms`: median step time (2 cores shared by the ranks: compute-bound here, not a network measurement).
Then, from bytes per parameter per rank, the largest Adam model each way fits in 80 GB per device (H100-class)
at this world size, parameters and training state only (no activations). The last line is the headline JSON:
FSDP2's state per rank against DDP's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.pipeline.model import deep_mlp
from plait.parallel.sharded import ShardedDataParallel

WAYS = ("ddp", "plain", "zero1", "zero2", "fsdp2")
BATCH = 32


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(tensors, optimizer) -> int:
    """Bytes of `tensors` and the optimizer's state tensors, local shards only, each storage range once (Plait's
    parameters and gradients are views of flat buffers)."""
    seen, total = set(), 0
    tensors = [*tensors, *(v for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor))]
    for t in tensors:
        t = _local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _rank(rank: int, world_size: int, way: str, depth: int, width: int, steps: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = deep_mlp(depth, width)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, 1, 28, 28, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    if way == "ddp":
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-4)
        params = list(ddp.parameters())

        def step(i: int) -> None:
            optimizer.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
    else:
        kwargs = dict(optimizer=optimizer_factory("adam", lr=1e-4))
        dp = (ShardedDataParallel(model, dims, **kwargs) if way == "fsdp2"
              else DataParallel(model, dims, shard_optimizer=way in ("zero1", "zero2"),
                                shard_gradients=way == "zero2", **kwargs))
        dp.broadcast_params()
        optimizer, params = dp.optimizer, list(dp.params)

        def step(i: int) -> None:
            dp.train_step([(x, y)], i)
    times = []
    for i in range(1, steps + 2):
        dist.barrier()
        start = time.perf_counter()
        step(i)
        if i > 1:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    grads = [p.grad for p in params if p.grad is not None]
    if way in ("zero1", "zero2"):  # ZeRO-2: the parameters hold no gradient, the slice's is the only one
        grads.append(dp.zero.shard.grad)  # the slice's own gradient copy (the slice itself aliases the parameters)
    state = _state_bytes([*params, *grads], optimizer)
    if way == "fsdp2":  # FSDP frees its gradient shards after the step; it holds them from backward to the step
        state += sum(_local(p).numel() * 4 for p in params)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    return {"state_mib": state / 2**20, "peak_rss_mib": rss / 1024, "step_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed steps (else 10)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    steps = 3 if args.quick else 10
    numel = sum(p.numel() for p in deep_mlp(args.depth, args.width).parameters())
    n = args.nproc
    table = {}
    for way in WAYS:
        results = spawn_ranks(_rank, n, way, args.depth, args.width, steps, backend="gloo", timeout_s=900)
        table[way] = {"state_mib": round(max(r["state_mib"] for r in results), 1),
                      "peak_rss_mib": round(max(r["peak_rss_mib"] for r in results), 1),
                      "step_ms": round(max(r["step_ms"] for r in results), 1)}
        print(json.dumps({"way": way, "ranks": n, **table[way]}), flush=True)
    # bytes per parameter per rank with Adam in fp32: parameter 4, gradient 4, two moments 8; Plait's ZeRO-1 also
    # keeps a gradient copy of its slice (the flat gradient is in backward order, so the slice is not a view of it);
    # ZeRO-2 keeps the parameters whole and only its slice of gradient and moments
    per_param = {"ddp": 16.0, "plain": 16.0, "zero1": 8 + 12 / n, "zero2": 4 + 12 / n, "fsdp2": 16 / n}
    budget = 80e9
    print(f"\n{numel:,} parameters, {n} ranks, Adam, fp32")
    print("way".ljust(8) + "state/rank MiB".rjust(16) + "peak RSS MiB".rjust(14) + "step ms".rjust(10)
          + "B/param/rank".rjust(14) + "fits in 80 GB".rjust(16))
    for way in WAYS:
        t = table[way]
        print(way.ljust(8) + f"{t['state_mib']:>16.1f}{t['peak_rss_mib']:>14.1f}{t['step_ms']:>10.1f}"
              + f"{per_param[way]:>14.1f}" + f"{budget / per_param[way] / 1e9:>13.1f} B params")
    print(json.dumps({"benchmark": "sharded_memory",
                      "metric": f"training state per rank (MiB), FSDP2 vs DistributedDataParallel, Adam, "
                                f"{numel:,}-parameter MLP, {n} gloo ranks",
                      "plait": table["fsdp2"]["state_mib"], "reference": table["ddp"]["state_mib"],
                      "ratio": round(table["fsdp2"]["state_mib"] / table["ddp"]["state_mib"], 3),
                      "goal": f"about 1/{n} of DDP's", "zero1_ratio":
                          round(table["zero1"]["state_mib"] / table["ddp"]["state_mib"], 3),
                      "zero2_ratio": round(table["zero2"]["state_mib"] / table["ddp"]["state_mib"], 3),
                      "step_ms": {w: table[w]["step_ms"] for w in WAYS},
                      "peak_rss_mib": {w: table[w]["peak_rss_mib"] for w in WAYS}}))


if __name__ == "__main__":
    main()
