"""Samples/s of Plait's DataParallel vs torch.nn.parallel.DistributedDataParallel, and the cost of a straggler
under BSP vs local SGD.

    .venv/bin/python benchmarks/ddp_throughput.py [--quick]

Part 1 (headline): 2 spawned ranks (gloo, 1 thread each), the same model, the same MNIST batches (32 per rank),
plain SGD, native all-reduce; Plait and DDP alternate in rounds inside one run and the median round is kept.
Plait: 1 MiB gradient buckets synced from backward hooks (flat buffers, gradients as bucket views). DDP: its
defaults (25 MiB buckets, first bucket 1 MiB).
Part 2: seconds per step with rank 1 slowed 3× (it sleeps twice its compute time every step), under BSP
(all-reduce every step) and local SGD (average every 8 steps); and with a transient straggler (3× on a random
third of its steps), where local SGD can absorb delays between averages.
The last line is the headline JSON (Plait / DDP samples/s on the 2NN).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from plait.core.models import build_model
from plait.data.images import load_image_set
from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.sampler import ShardedSampler

BATCH = 32


def _batches(rank: int, world_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    arrays = load_image_set("mnist")
    images, labels = torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"])
    sampler = ShardedSampler(len(labels), batch_size=BATCH, accumulate=1, rank=rank, world_size=world_size, seed=0)
    out = []
    for step in range(1, steps + 1):
        idx = sampler.indices(step)[0]
        out.append((images[idx].float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1), labels[idx]))
    return out


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name)


def _timed(loop) -> float:
    dist.barrier()
    start = time.perf_counter()
    loop()
    dist.barrier()
    return time.perf_counter() - start


def _plait_run(name: str, dims: ParallelDims, batches) -> float:
    dp = DataParallel(_model(name), dims, bucket_bytes=1 << 20, optimizer=optimizer_factory(lr=0.01))
    dp.broadcast_params()
    dp.train_step([batches[0]], 1)  # warm-up

    def loop() -> None:
        for step, batch in enumerate(batches[1:], start=2):
            dp.train_step([batch], step)

    seconds = _timed(loop)
    dp.close()
    return seconds


def _ddp_run(name: str, batches) -> float:
    model = DistributedDataParallel(_model(name))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def one(batch) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()

    one(batches[0])

    def loop() -> None:
        for batch in batches[1:]:
            one(batch)

    return _timed(loop)


def _straggler_run(dims: ParallelDims, batches, kind: str, probability: float, seed: int = 0) -> float:
    dp = DataParallel(_model("2nn"), dims, kind=kind, local_steps=8, bucket_bytes=1 << 20,
                      optimizer=optimizer_factory(lr=0.01))
    dp.broadcast_params()
    rank = dist.get_rank()
    last_compute = 0.0

    def loop() -> None:
        nonlocal last_compute
        for step, batch in enumerate(batches, start=1):
            slow = rank == 1 and random.Random(f"{seed}:{step}").random() < probability
            delay = 2.0 * last_compute if slow else 0.0  # a 3× step: compute, then twice as long again
            _, times = dp.train_step([batch], step, delay_s=delay)
            last_compute = times.compute_s - delay

    seconds = _timed(loop)
    dp.close()
    return seconds / len(batches)


def _bench_rank(rank: int, world_size: int, models: list[str], steps: int, rounds: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    batches = _batches(rank, world_size, steps + 1)
    out: dict = {}
    for name in models:
        plait, ddp = [], []
        for _ in range(rounds):  # alternate, so both see the same background load
            plait.append(_plait_run(name, dims, batches))
            ddp.append(_ddp_run(name, batches))
        samples = steps * BATCH * world_size
        out[name] = {"plait": samples / statistics.median(plait), "ddp": samples / statistics.median(ddp)}
    straggle = batches[: max(steps, 64)]
    for label, probability in (("constant", 1.0), ("transient", 1 / 3)):
        out[f"straggler_{label}"] = {kind: _straggler_run(dims, straggle, kind, probability)
                                     for kind in ("allreduce", "local_sgd")}
    out["no_straggler"] = {kind: _straggler_run(dims, straggle, kind, 0.0) for kind in ("allreduce", "local_sgd")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models = ["2nn"] if args.quick else ["2nn", "cnn"]
    steps, rounds = (100, 3) if args.quick else (200, 5)
    res = spawn_ranks(_bench_rank, 2, models, steps, rounds, timeout_s=3000)[0]
    lines = []
    for name in models:
        r = res[name]
        print(f"{name}: Plait {r['plait']:.0f} samples/s, DDP {r['ddp']:.0f} samples/s, "
              f"ratio {r['plait'] / r['ddp']:.3f}")
        lines.append({"benchmark": "ddp_throughput", "metric": f"samples_per_s_{name}_2ranks",
                      "plait": round(r["plait"], 1), "reference": round(r["ddp"], 1),
                      "ratio": round(r["plait"] / r["ddp"], 3), "goal": 1.0})
    for label in ("no_straggler", "straggler_constant", "straggler_transient"):
        r = res[label]
        print(f"{label}: s/step BSP {r['allreduce'] * 1e3:.2f} ms, local SGD (H=8) {r['local_sgd'] * 1e3:.2f} ms")
        lines.append({"benchmark": "ddp_throughput", "metric": f"s_per_step_{label}_local_sgd_vs_bsp",
                      "plait": round(r["local_sgd"], 5), "reference": round(r["allreduce"], 5),
                      "ratio": round(r["local_sgd"] / r["allreduce"], 3), "goal": None})
    headline = lines[0]
    for line in lines[1:] + [headline]:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
