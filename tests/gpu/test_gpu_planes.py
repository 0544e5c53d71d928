"""The cluster planes on CUDA with NCCL. Skipped without CUDA (every test here needs a GPU); the tests that need
two GPUs are skipped with fewer. Run: `pytest -q tests/gpu/`.

- data parallel on 1 NCCL rank: fp32, bf16 and fp16 (grad scaler), with and without communication hooks: the loss
  and every state tensor live on cuda:LOCAL_RANK, and the run learns; FSDP2 (`sharded`) and ZeRO-1 likewise;
- the data-parallel trainer end to end (`plait train` path: run directory, metrics, checkpoint) on 1 NCCL rank;
- a one-stage pipeline on cuda (1F1B over micro-batches, pipelined inference), fp32 and bf16;
- with 2 GPUs: the own ring / tree / naive all-reduce over NCCL point-to-point, and a two-stage pipeline.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.core.models import build_model
from plait.parallel.collectives import make_allreduce
from plait.parallel.comm_hooks import make_comm_hook
from plait.parallel.data_parallel import DataParallel
from plait.parallel.device import rank_device, use_device
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.pipeline.inference import pipelined_forward
from plait.parallel.pipeline.model import build_sequential
from plait.parallel.pipeline.partition import split_layers
from plait.parallel.pipeline.schedule import build_schedule
from plait.parallel.pipeline.stage import PipelineStage, Placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _batches(device: torch.device, count: int, batch: int = 64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(count * batch, 1, 28, 28, generator=gen)
    y = (x.flatten(1) @ torch.randn(784, 10, generator=gen)).argmax(1)
    return [(x[i * batch:(i + 1) * batch].to(device), y[i * batch:(i + 1) * batch].to(device)) for i in range(count)]


def _dp_rank(rank: int, world_size: int, precision: str, hook: str) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    dp = DataParallel(build_model("2nn").to(device), dims, optimizer=optimizer_factory(lr=0.05, momentum=0.9),
                      precision=precision, comm_hook=make_comm_hook(hook, start_step=2), bucket_bytes=1 << 18)
    batches = _batches(device, 60)
    losses = [dp.train_step([batch], step)[0] for step, batch in enumerate(batches, 1)]
    devices = {str(t.device) for t in (*losses, dp.flat_param, dp.grad_sync.flat_grad,
                                       *dp.optimizer_state().values())}
    out = {"device": str(device), "devices": sorted(devices), "first": float(sum(losses[:5]) / 5),
           "last": float(sum(losses[-5:]) / 5), "scaler": dp.precision.scaler is not None}
    dp.close()
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hook", ["none", "fp16", "powersgd", "topk"])
def test_data_parallel_on_one_nccl_rank(precision, hook):
    out = spawn_ranks(_dp_rank, 1, precision, hook, backend="nccl", timeout_s=300)[0]
    assert out["device"] == "cuda:0"
    assert out["devices"] == ["cuda:0"]
    assert out["scaler"] == (precision == "fp16")
    assert out["last"] < 0.7 * out["first"]


def _sharded_rank(rank: int, world_size: int, way: str) -> dict:
    from plait.parallel.sharded import ShardedDataParallel

    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    model = build_model("2nn").to(device)
    kwargs = dict(optimizer=optimizer_factory("adam", lr=1e-3), precision="bf16")
    dp = (ShardedDataParallel(model, dims, **kwargs) if way == "fsdp2"
          else DataParallel(model, dims, shard_optimizer=True, **kwargs))
    losses = [dp.train_step([batch], step)[0] for step, batch in enumerate(_batches(device, 60), 1)]
    state = dp.optimizer_state()
    out = {"devices": sorted({str(t.device) for t in (*losses, dp.full_params(), *state.values()) if t.dim() > 0}),
           "first": float(sum(losses[:5]) / 5), "last": float(sum(losses[-5:]) / 5)}
    dp.close()
    return out


@pytest.mark.parametrize("way", ["fsdp2", "zero1"])
def test_sharded_ways_on_one_nccl_rank(way):
    out = spawn_ranks(_sharded_rank, 1, way, backend="nccl", timeout_s=300)[0]
    assert out["devices"] == ["cuda:0"]
    assert out["last"] < 0.7 * out["first"]


CONFIG = """
[run]
name = "dp"
root = "{root}"
[parallel]
backend = "nccl"
[train]
steps = 20
batch_size = 64
log_every = 5
checkpoint_every = 10
eval_at_end = true
precision = "bf16"
"""


def test_trainer_end_to_end_on_one_nccl_rank(tmp_path):
    from plait.experiment.runs.data_parallel import main
    from plait.runtime.checkpoint import load_checkpoint
    from plait.runtime.metrics_log import read_metrics

    path = tmp_path / "dp.toml"
    path.write_text(CONFIG.format(root=tmp_path.as_posix()))
    main(path, 1, False, [], None)
    records = read_metrics(tmp_path / "dp" / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert "test_accuracy" in records[-1]
    assert load_checkpoint(tmp_path / "dp" / "checkpoint.pt")["params"].device.type == "cpu"  # files hold host copies


def _pipeline_rank(rank: int, world_size: int, precision: str) -> dict:
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    module = build_sequential("mlp", 4, 128).to(device)
    stage = PipelineStage(module, Placement(stage=0, num_stages=1, prev_rank=None, next_rank=None),
                          loss_fn=F.cross_entropy, precision=precision)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in _batches(device, 40):
        optimizer.zero_grad(set_to_none=True)
        losses.append(stage.train_step(build_schedule("1f1b", 1, 4), 64, x, y).loss)
        optimizer.step()
    logits = pipelined_forward(stage, 64, 2, x)
    return {"loss_device": str(losses[-1].device), "logits_device": str(logits.device),
            "first": float(sum(losses[:5]) / 5), "last": float(sum(losses[-5:]) / 5)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_stage_pipeline_on_cuda(precision):
    out = spawn_ranks(_pipeline_rank, 1, precision, backend="nccl", timeout_s=300)[0]
    assert out["loss_device"] == out["logits_device"] == "cuda:0"
    assert out["last"] < 0.8 * out["first"]


def _allreduce_rank(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()
    use_device(device)
    out = {}
    for name in ("native", "ring", "tree", "naive"):
        ar = make_allreduce(name, dims.grad_group)
        tensor = torch.arange(1001, dtype=torch.float32, device=device) * (rank + 1)
        ar.all_reduce_async(tensor).wait()
        out[name] = tensor.cpu().numpy()
        ar.close()
    return out


@two_gpus
def test_own_allreduce_algorithms_over_nccl_point_to_point():
    results = spawn_ranks(_allreduce_rank, 2, backend="nccl", timeout_s=300)
    expected = torch.arange(1001, dtype=torch.float32).numpy() * 3
    for name in ("native", "ring", "tree", "naive"):
        for out in results:
            assert (out[name] == expected).all(), name


def _two_stage_rank(rank: int, world_size: int) -> dict:
    device = rank_device()
    use_device(device)
    torch.manual_seed(0)
    module = split_layers(build_sequential("mlp", 4, 128), [2])[rank].to(device)
    placement = Placement(stage=rank, num_stages=2, prev_rank=0 if rank else None, next_rank=None if rank else 1)
    stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if rank == 1 else None)
    x, y = _batches(device, 1)[0]
    record = stage.train_step(build_schedule("1f1b", 2, 4), 64, x if rank == 0 else None, y if rank == 1 else None)
    return {"loss_device": str(record.loss.device) if record.loss is not None else None,
            "grads_on": sorted({str(p.grad.device) for p in module.parameters()})}


@two_gpus
def test_two_stage_pipeline_over_nccl():
    results = spawn_ranks(_two_stage_rank, 2, backend="nccl", timeout_s=300)
    assert results[1]["loss_device"] == "cuda:1"
    assert results[0]["grads_on"] == ["cuda:0"] and results[1]["grads_on"] == ["cuda:1"]
