"""Every cluster plane on one GPU, AMP off and on, and the same on the CPU: what ran, and its speed.

    .venv/bin/python benchmarks/gpu_smoke.py [--steps 50] [--cpu-only]

Each run is one spawned rank (NCCL on cuda:0, gloo on the CPU) on synthetic MNIST-shaped batches:
- data parallel (`DataParallel`, the 2NN and the CNN, batch 256): fp32, bf16 and fp16 (grad scaler) on CUDA; fp32
  and bf16 on the CPU; with the PowerSGD and fp16 communication hooks (one rank: the hooks run, nothing moves);
  ZeRO-1 (`shard_optimizer`) and FSDP2 (`ShardedDataParallel`) in bf16;
- pipeline (`PipelineStage`, one stage of the 8-layer MLP, 1F1B over 4 micro-batches, then pipelined inference):
  fp32 and bf16.
One line of JSON per run ({"plane", "device", "precision", "steps_per_s", "loss", ...}); the last line is the
headline: data-parallel CNN steps/s on the GPU (fp32) against the CPU. Without CUDA the script prints one JSON line
saying it was skipped and exits 0 (`--cpu-only` runs the CPU half anyway, to check the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F

from plait.core.models import build_model
from plait.parallel.comm_hooks import make_comm_hook
from plait.parallel.data_parallel import DataParallel
from plait.parallel.device import rank_device, use_device
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import build_optimizer, optimizer_factory
from plait.parallel.pipeline.inference import pipelined_forward
from plait.parallel.pipeline.model import build_sequential
from plait.parallel.pipeline.schedule import build_schedule
from plait.parallel.pipeline.stage import PipelineStage, Placement
from plait.parallel.sharded import ShardedDataParallel

BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timings must include the queued kernels


def _batches(device: torch.device, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 1, 28, 28, generator=gen).to(device),
             torch.randint(0, 10, (BATCH,), generator=gen).to(device)) for _ in range(count)]


def _data_parallel(rank: int, world_size: int, model_name: str, precision: str, hook: str, steps: int,
                   way: str = "plain") -> dict:
    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    if way == "fsdp2":
        dp = ShardedDataParallel(model, dims, optimizer=optimizer_factory(lr=0.01, momentum=0.9), precision=precision)
    else:
        dp = DataParallel(model, dims, optimizer=optimizer_factory(lr=0.01, momentum=0.9), precision=precision,
                          comm_hook=make_comm_hook(hook, start_step=2), shard_optimizer=way == "zero1")
    batches = _batches(device, 4)
    for step in range(1, 6):  # warm-up: kernels, autocast caches, allocator
        dp.train_step([batches[step % 4]], step)
    _sync(device)
    start = time.perf_counter()
    for step in range(6, 6 + steps):
        loss, _ = dp.train_step([batches[step % 4]], step)
    _sync(device)
    seconds = time.perf_counter() - start
    dp.close()
    return {"plane": "data_parallel", "way": way, "model": model_name, "device": str(device),
            "backend": dims_backend(), "precision": precision, "hook": hook, "steps_per_s": round(steps / seconds, 2),
            "loss": round(float(loss), 4), "scaler": dp.precision.scaler is not None}


def dims_backend() -> str:
    import torch.distributed as dist
    return dist.get_backend()


def _pipeline(rank: int, world_size: int, precision: str, steps: int) -> dict:
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    module = build_sequential("mlp", 8, 1024).to(device)
    stage = PipelineStage(module, Placement(stage=0, num_stages=1, prev_rank=None, next_rank=None),
                          loss_fn=F.cross_entropy, precision=precision)
    optimizer = build_optimizer(module.parameters(), "sgd", lr=0.01, momentum=0.9)
    schedule = build_schedule("1f1b", 1, 4)
    x, y = _batches(device, 1)[0]
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        stage.train_step(schedule, BATCH, x, y)
        optimizer.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        record = stage.train_step(schedule, BATCH, x, y)
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    logits = pipelined_forward(stage, BATCH, 4, x)
    return {"plane": "pipeline", "model": "mlp8x1024", "device": str(device), "backend": dims_backend(),
            "precision": precision, "steps_per_s": round(steps / seconds, 2), "loss": round(float(record.loss), 4),
            "inference_device": str(logits.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU half even without CUDA")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_only:
        print(json.dumps({"benchmark": "gpu_smoke", "skipped": "no CUDA device on this machine"}))
        return
    runs = []  # (backend, function, args)
    targets = ([("nccl", ("fp32", "bf16", "fp16"))] if cuda else []) + [("gloo", ("fp32", "bf16"))]
    for backend, precisions in targets:
        for precision in precisions:
            for model_name in ("2nn", "cnn"):
                runs.append((backend, _data_parallel, (model_name, precision, "none", args.steps)))
            runs.append((backend, _pipeline, (precision, args.steps)))
        for hook in ("fp16", "powersgd"):
            runs.append((backend, _data_parallel, ("cnn", "fp32", hook, args.steps)))
        for way in ("zero1", "fsdp2"):  # sharded optimizer state; FSDP2 (bf16: fp16 needs one scaler over shards)
            runs.append((backend, _data_parallel, ("cnn", "bf16", "none", args.steps, way)))
    results = []
    for backend, fn, fn_args in runs:
        try:
            result = spawn_ranks(fn, 1, *fn_args, backend=backend, timeout_s=600, threads_per_rank=0)[0]
        except Exception as err:  # say what failed and go on with the others
            result = {"plane": fn.__name__.strip("_"), "backend": backend, "args": list(map(str, fn_args)),
                      "error": str(err).splitlines()[0][:300]}
        results.append(result)
        print(json.dumps(result), flush=True)

    def speed(device_prefix: str) -> float | None:
        for r in results:
            if (r.get("plane") == "data_parallel" and r.get("model") == "cnn" and r.get("precision") == "fp32"
                    and r.get("hook") == "none" and r.get("way") == "plain"
                    and r.get("device", "").startswith(device_prefix)):
                return r["steps_per_s"]
        return None

    gpu, cpu = speed("cuda"), speed("cpu")
    failed = sum("error" in r for r in results)
    print(json.dumps({"benchmark": "gpu_smoke", "metric": "data-parallel CNN steps/s, batch 256, fp32: cuda:0 "
                      "(NCCL, 1 rank) vs CPU (gloo, 1 rank)", "plait": gpu, "reference": cpu,
                      "ratio": round(gpu / cpu, 2) if gpu and cpu else None, "goal": "every run completes",
                      "runs": len(results), "failed": failed}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
