"""`sync.kind = "sharded"` (FSDP2's fully_shard on gloo) and `sync.shard_optimizer` (ZeRO-1) on 2 real ranks: both
train to the same parameters and optimizer state as plain data parallel (float tolerance), each rank holds half of
every parameter (FSDP) or half of the optimizer state (ZeRO-1), and the trainer checkpoints and resumes either to
the same end as an uninterrupted run (ZeRO-2 too; its equality with plain data parallel: test_parallel_zero2.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from plait.core.models import mnist_2nn
from plait.experiment.runs.data_parallel import main
from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.sharded import ShardedDataParallel
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics

CASES = {"sgd": dict(optimizer=optimizer_factory("sgd", lr=0.1, momentum=0.9)),
         "adamw": dict(optimizer=optimizer_factory("adamw", lr=0.01, weight_decay=0.01))}


def _model() -> nn.Module:
    torch.manual_seed(3)
    return mnist_2nn(hidden=24)


def _train_rank(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 2, 2, 8, 1, 28, 28, generator=gen), torch.randint(0, 10, (6, 2, 2, 8), generator=gen)
    out = {}
    for case, kwargs in CASES.items():
        for kind, cls in (("plain", DataParallel), ("sharded", ShardedDataParallel), ("zero1", DataParallel)):
            model = _model()
            if rank == 1:  # replicas start from rank 0's parameters whatever they were built with
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            dp = cls(model, dims, **kwargs, **({"shard_optimizer": True} if kind == "zero1" else {}))
            dp.broadcast_params()
            for step in range(1, 6):  # two micro-batches per step: accumulation, then one sync
                dp.train_step([(x[step, rank, k], y[step, rank, k]) for k in range(2)], step)
            out[(case, kind)] = {"params": dp.full_params().detach().numpy().copy(),
                                 "optim": {k: v.numpy().copy() for k, v in dp.optimizer_state().items()}}
            if kind == "sharded":
                out[(case, "local")] = sum(p.to_local().numel() for p in dp.params)
                out[(case, "full")] = dp.num_params
            if kind == "zero1":
                out[(case, "zero1_state")] = sum(v.numel() for v in dp.optimizer.state[dp.zero.shard].values()
                                                 if v.dim() > 0)
            dp.close()
    return out


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return spawn_ranks(_train_rank, 2, backend="gloo", timeout_s=240)


@pytest.mark.parametrize("kind", ["sharded", "zero1"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_plain_data_parallel(trained, case, kind):
    for out in trained:
        plain, sharded = out[(case, "plain")], out[(case, kind)]
        np.testing.assert_allclose(sharded["params"], plain["params"], rtol=1e-5, atol=1e-6)
        assert sharded["optim"].keys() == plain["optim"].keys()
        for key in plain["optim"]:
            np.testing.assert_allclose(sharded["optim"][key], plain["optim"][key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trained[0][(case, kind)]["params"], trained[1][(case, kind)]["params"])


def test_each_rank_holds_half_of_every_parameter(trained):
    local = [out[("sgd", "local")] for out in trained]
    full = trained[0][("sgd", "full")]
    assert sum(local) == full
    assert max(local) <= full // 2 + 64  # dim-0 shards: uneven rows differ by at most one row per parameter


def test_zero1_keeps_half_of_the_optimizer_state_per_rank(trained):
    full = trained[0][("adamw", "full")]
    per_rank = [out[("adamw", "zero1_state")] for out in trained]
    assert per_rank == [full, full]  # Adam's two moments, each over half of the parameters


CONFIG = """
[run]
name = "dp"
root = "{root}"
[sync]
{sync}
[train]
steps = {steps}
batch_size = 16
optimizer = "adam"
lr = 0.001
log_every = 2
checkpoint_every = 4
eval_at_end = false
"""


def _run(tmp_path, name: str, steps: int, sync: str, resume: bool = False, overrides: tuple[str, ...] = ()):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(root=(tmp_path / name).as_posix(), steps=steps, sync=sync))
    main(path, 2, resume, list(overrides), None)
    return load_checkpoint(tmp_path / name / "dp" / "checkpoint.pt")


@pytest.mark.parametrize("sync", ['kind = "sharded"',
                                  pytest.param("shard_optimizer = true", marks=pytest.mark.slow),
                                  pytest.param("shard_optimizer = true\nshard_gradients = true",
                                               marks=pytest.mark.slow)])
def test_trainer_checkpoints_and_resumes_a_sharded_run(tmp_path, sync):
    whole = _run(tmp_path, "whole", 8, sync)
    _run(tmp_path, "split", 4, sync)
    resumed = _run(tmp_path, "split", 8, sync, resume=True)
    assert whole["step"] == resumed["step"] == 8
    assert whole["params"].numel() == 199_210  # the full 2NN, gathered from the shards
    torch.testing.assert_close(resumed["params"], whole["params"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["optim"]["exp_avg"], whole["optim"]["exp_avg"], rtol=1e-5, atol=1e-6)
    # the run's model.safetensors: the whole model, gathered from the shards, the checkpoint's weights
    model = mnist_2nn()
    model.load_state_dict(load_file(str(tmp_path / "whole" / "dp" / "model.safetensors")))
    assert torch.equal(nn.utils.parameters_to_vector(model.parameters()), whole["params"])


def test_a_sharded_run_evaluates_at_the_end_on_every_rank(tmp_path):
    """FSDP2's forward is a collective: rank 0 evaluating alone would wait for the others forever."""
    _run(tmp_path, "eval", 2, 'kind = "sharded"', overrides=("train.eval_at_end=true",))
    records = read_metrics(tmp_path / "eval" / "dp" / "metrics.jsonl")
    assert 0.0 <= records[-1]["test_accuracy"] <= 1.0 and records[-1]["test_loss"] > 0
