"""Mixed precision and hooks from a config: bf16 autocast on the CPU runs the forward in bf16 and keeps the
parameters, gradients and sync in fp32, and learns like fp32; the trainer runs end to end with
`train.precision = "bf16"` and `comm_hook.name = "powersgd"`; mistaken combinations are errors naming the setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.experiment.runs.data_parallel import main
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import from_dict


def _bf16_train(dims: ParallelDims, x: torch.Tensor, y: torch.Tensor, precision: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    dp = DataParallel(model, dims, optimizer=optimizer_factory(lr=0.1, momentum=0.9), precision=precision)
    losses = [dp.train_step([(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16])], i + 1)[0] for i in range(40)]
    result = {"losses": [float(v) for v in losses], "activation": str(seen[0]),
              "grad": str(dp.grad_sync.flat_grad.dtype), "param": str(dp.flat_param.dtype)}
    dp.close()
    return result


def _bf16_rank(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40 * 16, 20, generator=gen)
    y = (x @ torch.randn(20, 5, generator=gen)).argmax(1)
    return {precision: _bf16_train(dims, x, y, precision) for precision in ("fp32", "bf16")}


def test_bf16_autocast_on_cpu_learns_like_fp32():
    out = spawn_ranks(_bf16_rank, 1, backend="gloo", timeout_s=120)[0]
    assert out["bf16"]["activation"] == "torch.bfloat16" and out["fp32"]["activation"] == "torch.float32"
    assert out["bf16"]["grad"] == out["bf16"]["param"] == "torch.float32"
    fp32, bf16 = torch.tensor(out["fp32"]["losses"]), torch.tensor(out["bf16"]["losses"])
    assert bf16[-10:].mean() < 0.6 * bf16[:5].mean()
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.max()


CONFIG = """
[run]
name = "dp"
root = "{root}"
[train]
steps = 12
batch_size = 16
log_every = 4
checkpoint_every = 0
eval_at_end = false
precision = "bf16"
[comm_hook]
name = "powersgd"
rank = 2
start_step = 3
"""


def test_trainer_runs_bf16_with_a_powersgd_hook_from_the_config(tmp_path):
    path = tmp_path / "dp.toml"
    path.write_text(CONFIG.format(root=tmp_path.as_posix()))
    main(path, 2, False, [], None)
    records = read_metrics(tmp_path / "dp" / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all(r["train_loss"] == r["train_loss"] for r in records)  # logged on logging steps only, and finite
    # after PowerSGD's warm-up each step sends less than the uncompressed 2NN gradient (199,210 floats)
    assert records[-1]["bytes_up_per_rank"][0] < 0.25 * 199_210 * 4


@pytest.mark.parametrize("raw, message", [
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"train": {"precision": "fp16"}, "sync": {"kind": "ps_one_device"}}, "ps_one_device"),
    ({"comm_hook": {"name": "powersgd"}, "compression": {"codec": "fp16"}}, "choose one"),
    ({"comm_hook": {"name": "topk"}, "sync": {"kind": "local_sgd"}}, "needs sync.kind"),
    ({"comm_hook": {"name": "gzip"}}, "comm_hook.name"),
    ({"comm_hook": {"name": "powersgd", "rank": 0}}, "comm_hook.rank"),
    ({"sync": {"kind": "local_sgd", "shard_optimizer": True}}, "sync.shard_optimizer"),
    ({"sync": {"shard_optimizer": True}, "train": {"precision": "fp16"}}, "sync.shard_optimizer"),
    ({"sync": {"kind": "sharded"}, "train": {"precision": "fp16"}}, "sharded"),
    ({"sync": {"kind": "sharded"}, "comm_hook": {"name": "fp16"}}, "needs sync.kind"),
])
def test_config_mistakes_name_the_setting(raw, message):
    with pytest.raises(ValueError, match=message):
        from_dict(DataParallelRunConfig, raw)


def test_pipeline_refuses_fp16():
    with pytest.raises(ValueError, match="use 'bf16'"):
        from_dict(PipelineRunConfig, {"train": {"precision": "fp16"}})


def _pipeline_rank(rank: int, world_size: int) -> dict:
    import torch.nn.functional as F

    from plait.parallel.pipeline.partition import split_layers
    from plait.parallel.pipeline.schedule import build_schedule
    from plait.parallel.pipeline.stage import PipelineStage, Placement

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 16, 12, generator=gen)
    y = (x @ torch.randn(12, 4, generator=gen)).argmax(-1)
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        module = split_layers(model, [2])[rank]
        placement = Placement(stage=rank, num_stages=2, prev_rank=0 if rank else None, next_rank=None if rank else 1)
        stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if rank == 1 else None, precision=precision)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for step in range(20):
            optimizer.zero_grad(set_to_none=True)
            record = stage.train_step(build_schedule("1f1b", 2, 4), 16, x[step] if rank == 0 else None,
                                      y[step] if rank == 1 else None)
            optimizer.step()
            if record.loss is not None:
                losses.append(float(record.loss))
        out[precision] = {"losses": losses, "wire": str(stage._shapes[4][0].output[1] if rank == 0 else
                                                       stage._shapes[4][0].input[1])}
    return out


def test_two_stage_pipeline_in_bf16_sends_bf16_and_learns_like_fp32():
    results = spawn_ranks(_pipeline_rank, 2, backend="gloo", timeout_s=120)
    assert results[0]["bf16"]["wire"] == results[1]["bf16"]["wire"] == "torch.bfloat16"  # activations on the wire
    assert results[0]["fp32"]["wire"] == "torch.float32"
    fp32, bf16 = torch.tensor(results[1]["fp32"]["losses"]), torch.tensor(results[1]["bf16"]["losses"])
    assert bf16[-5:].mean() < 0.8 * bf16[:3].mean()
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.max()
