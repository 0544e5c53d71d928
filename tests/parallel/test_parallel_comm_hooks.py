"""Communication hooks on 2 real gloo ranks: fp16/bf16 equal the plain all-reduce to their precision, PowerSGD and
top-k on shared indices follow the uncompressed loss curve while sending less, replicas stay bit-identical, and a
user's own hook (a torch Future, as DDP's hooks return) plugs into the same interface.

One spawn trains every variant on the same small problem (a teacher network's labels, a 3-layer MLP); the asserts
compare the variants in the parent.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.collectives import make_allreduce
from plait.parallel.comm_hooks import CastHook, GradBucket, allreduce_hook, make_comm_hook
from plait.parallel.data_parallel import DataParallel
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.powersgd import PowerSGDHook
from plait.parallel.topk_hook import SharedTopKHook

STEPS, BATCH, IN, HIDDEN, CLASSES, LR = 80, 32, 32, 64, 8, 0.05


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(STEPS * BATCH * 2, IN, generator=gen)
    teacher = torch.randn(IN, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(1)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


class FutureHook:
    """A user's hook written as for DDP: torch's own async all-reduce, a Future that yields the mean."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, bucket: GradBucket):
        self.calls += 1
        n = bucket.allreduce.world_size
        work = dist.all_reduce(bucket.buffer, group=bucket.allreduce.group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(n))


def _hooks() -> dict:
    return {"none": None, "allreduce": allreduce_hook, "fp16": CastHook(torch.float16),
            "bf16": CastHook(torch.bfloat16), "powersgd": PowerSGDHook(rank=2, start_step=5, seed=3),
            "topk": SharedTopKHook(ratio=0.1), "user": FutureHook(),
            # the same hooks over Plait's own ring (a worker thread, point-to-point): same numbers, as sums agree
            "powersgd_ring": PowerSGDHook(rank=2, start_step=5, seed=3), "topk_ring": SharedTopKHook(ratio=0.1)}


def _train_rank(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    x, y = _data()
    out = {}
    for name, hook in _hooks().items():
        allreduce = make_allreduce("ring" if name.endswith("_ring") else "native", dims.grad_group)
        dp = DataParallel(_model(), dims, bucket_bytes=8192, optimizer=optimizer_factory(lr=LR, momentum=0.9),
                          comm_hook=hook, allreduce=allreduce)
        dp.broadcast_params()
        losses, first_grad, bytes_after = [], None, []
        for step in range(1, STEPS + 1):
            start = ((step - 1) * world_size + rank) * BATCH
            loss, _ = dp.train_step([(x[start:start + BATCH], y[start:start + BATCH])], step)
            losses.append(loss)
            if step == 1:
                first_grad = dp.grad_sync.flat_grad.clone()
            bytes_after.append(dp.bytes_moved()[0])
        # numpy across the process boundary (tensors would travel as shared memory the rank frees on exit)
        out[name] = {"losses": torch.stack(losses).numpy(), "params": dp.flat_param.numpy().copy(),
                     "first_grad": first_grad.numpy(),
                     "bytes": bytes_after, "buckets": len(dp.grad_sync.buckets),
                     "calls": getattr(hook, "calls", None)}
        dp.close()
    return out


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    ranks = spawn_ranks(_train_rank, 2, timeout_s=300)
    return [{name: {key: torch.from_numpy(value) if hasattr(value, "dtype") else value
                    for key, value in variant.items()} for name, variant in out.items()} for out in ranks]


def _mean_loss(trained, name: str) -> torch.Tensor:
    return (trained[0][name]["losses"] + trained[1][name]["losses"]) / 2


@pytest.mark.parametrize("name", ["none", "allreduce", "fp16", "bf16", "powersgd", "topk", "user", "powersgd_ring",
                                  "topk_ring"])
def test_replicas_stay_bit_identical(trained, name):
    assert torch.equal(trained[0][name]["params"], trained[1][name]["params"])


def test_allreduce_hook_and_user_hook_equal_the_built_in_sync(trained):
    for name in ("allreduce", "user"):
        assert torch.allclose(trained[0][name]["params"], trained[0]["none"]["params"], atol=1e-6)


def test_user_hook_is_called_once_per_bucket_and_step(trained):
    buckets = trained[0]["user"]["buckets"]
    assert buckets >= 2
    assert trained[0]["user"]["calls"] == buckets * STEPS


@pytest.mark.parametrize("name, rtol", [("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_cast_hooks_equal_the_all_reduce_to_their_precision(trained, name, rtol):
    exact, cast = trained[0]["none"]["first_grad"], trained[0][name]["first_grad"]
    scale = exact.abs().max()
    assert (cast - exact).abs().max() <= rtol * scale
    assert not torch.equal(cast, exact)  # the wire really was 16-bit


@pytest.mark.parametrize("name", ["powersgd", "topk", "powersgd_ring", "topk_ring"])
def test_compressed_hooks_follow_the_uncompressed_loss_curve(trained, name):
    plain, compressed = _mean_loss(trained, "none"), _mean_loss(trained, name)
    assert compressed[-10:].mean() < 0.5 * compressed[:5].mean()  # it learns
    # close to the uncompressed curve over the whole run, not only at the end
    window = 10
    for end in range(window, STEPS + 1, window):
        a, b = plain[end - window:end].mean(), compressed[end - window:end].mean()
        assert abs(b - a) <= 0.15 * a + 0.05, (name, end, float(a), float(b))


@pytest.mark.parametrize("name, at_most", [("fp16", 0.51), ("powersgd", 0.35), ("topk", 0.25)])
def test_compressed_hooks_send_less(trained, name, at_most):
    def last_steps(variant):  # bytes of the last 20 steps (after PowerSGD's warm-up)
        sent = trained[0][variant]["bytes"]
        return sent[-1] - sent[-21]
    assert last_steps(name) <= at_most * last_steps("none")


def test_make_comm_hook_by_name_and_import_path():
    assert make_comm_hook("none") is None
    assert make_comm_hook("allreduce") is allreduce_hook
    assert isinstance(make_comm_hook("powersgd", rank=2), PowerSGDHook)
    assert make_comm_hook("plait.parallel.comm_hooks:allreduce_hook") is allreduce_hook
    assert isinstance(make_comm_hook("plait.parallel.topk_hook:SharedTopKHook"), SharedTopKHook)  # a class: built
    with pytest.raises(ValueError, match="comm_hook.name"):
        make_comm_hook("gzip")
    with pytest.raises(ValueError, match="cannot import"):
        make_comm_hook("no_such_module:hook")
    with pytest.raises(ValueError, match="comm_hook.rank"):
        PowerSGDHook(rank=0)


RESUME_CONFIG = """
[run]
name = "dp"
root = "{root}"
[train]
steps = {steps}
batch_size = 16
log_every = 2
checkpoint_every = 4
eval_at_end = false
[comm_hook]
name = "{hook}"
rank = 2
start_step = 2
ratio = 0.05
"""


@pytest.mark.parametrize("hook", [pytest.param("powersgd", marks=pytest.mark.slow), "topk"])
def test_stopped_and_resumed_run_with_a_hook_ends_bit_identical(tmp_path, hook):
    from plait.experiment.runs.data_parallel import main
    from plait.runtime.checkpoint import load_checkpoint

    def run(name: str, steps: int, resume: bool = False) -> dict:
        path = tmp_path / f"{name}.toml"
        path.write_text(RESUME_CONFIG.format(root=(tmp_path / name).as_posix(), steps=steps, hook=hook))
        main(path, 2, resume, [], None)
        return load_checkpoint(tmp_path / name / "dp" / "checkpoint.pt")

    whole = run("whole", 8)
    run("split", 4)
    resumed = run("split", 8, resume=True)
    assert torch.equal(resumed["params"], whole["params"])
    assert len(resumed["hook_states"]) == 2  # each rank's own state
