"""Device logic of the cluster planes, proven without a GPU.

The trick: run the data-parallel step and a two-stage pipeline with the model on the `meta` device, which no line
of Plait names, under a dispatch mode that sees every tensor of every operation (inputs and outputs). Anything
created on a hard-coded device, or left on the default one, shows up as a tensor off `meta`. (Meta tensors carry
shapes and dtypes but no data, so the maths runs without numbers; correctness of the numbers is the other tests'
job.) A static check then holds the rest of the code to the rule: every tensor factory in `parallel/` names its
device, except a short list of host-side tensors, each with its reason.
"""

from __future__ import annotations

import ast
import queue
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import plait.parallel
from plait.core.compress import make_codec
from plait.parallel.collectives import make_allreduce
from plait.parallel.comm_hooks import CastHook
from plait.parallel.compression import GradCompressor
from plait.parallel.data_parallel import DataParallel
from plait.parallel.device import rank_device
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import spawn_ranks
from plait.parallel.optim import optimizer_factory
from plait.parallel.pipeline import stage as stage_module
from plait.parallel.pipeline.inference import pipelined_forward
from plait.parallel.pipeline.partition import split_layers
from plait.parallel.pipeline.schedule import build_schedule
from plait.parallel.pipeline.stage import PipelineStage, Placement
from plait.parallel.powersgd import PowerSGDHook
from plait.parallel.precision import MixedPrecision
from plait.parallel.topk_hook import SharedTopKHook

META = torch.device("meta")


class DeviceWatch(TorchDispatchMode):
    """Records every operation that touches a tensor off `device` (its name, the stray device, the shape)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.strays = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.strays.append((str(func), str(t.device), tuple(t.shape)))
        return out


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# ---- rank_device --------------------------------------------------------------------------------------------------
def test_rank_device_follows_local_rank_under_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("nccl") == torch.device("cuda", 1)
    assert rank_device("gloo") == torch.device("cpu")  # gloo's point-to-point takes CPU tensors
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK = 2"):
        rank_device("nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("nccl") == torch.device("cpu")


def test_precision_setting_is_checked():
    with pytest.raises(ValueError, match="train.precision"):
        MixedPrecision("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MixedPrecision("fp16", torch.device("cpu"))
    assert MixedPrecision("bf16", torch.device("cpu")).scaler is None


# ---- data parallel on meta ----------------------------------------------------------------------------------------
DP_VARIANTS = {
    "native": dict(allreduce="native"),
    "ring_two_micro_batches": dict(allreduce="ring"),
    "local_sgd": dict(kind="local_sgd", local_steps=1),
    "ps_one_device": dict(kind="ps_one_device"),
    "adam": dict(optimizer="adam", lr=1e-3),
    "fp16_hook": dict(comm_hook="fp16"),
    "powersgd_hook": dict(comm_hook="powersgd"),
    "topk_hook": dict(comm_hook="topk"),
    "fp16_codec": dict(compressor="fp16"),
    "zero1": dict(shard_optimizer=True, optimizer="adam", lr=1e-3),
}


def _dp_on_meta(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size).build()
    out = {}
    for name, kwargs in DP_VARIANTS.items():
        kwargs = dict(kwargs)
        hook = kwargs.pop("comm_hook", None)
        if hook is not None:
            kwargs["comm_hook"] = {"fp16": CastHook(torch.float16), "powersgd": PowerSGDHook(rank=2, start_step=0),
                                   "topk": SharedTopKHook(ratio=0.25)}[hook]
        if "compressor" in kwargs:
            kwargs["compressor"] = GradCompressor(make_codec(kwargs.pop("compressor")), error_feedback=True)
        if "allreduce" in kwargs:
            kwargs["allreduce"] = make_allreduce(kwargs["allreduce"], dims.grad_group)
        kwargs["optimizer"] = optimizer_factory(kwargs.pop("optimizer", "sgd"), lr=kwargs.pop("lr", 0.1))
        dp = DataParallel(_model().to(META), dims, bucket_bytes=256, **kwargs)
        batches = [(torch.empty(6, 12, device=META), torch.empty(6, dtype=torch.long, device=META))] * (
            2 if "two" in name else 1)
        watch = DeviceWatch(META)
        with watch:
            for step in (1, 2, 3):
                loss, _ = dp.train_step(batches, step)
        out[name] = {"strays": watch.strays, "loss": str(loss.device), "buckets": len(dp.grad_sync.buckets)}
        dp.close()
    return out


@pytest.fixture(scope="module")
def dp_on_meta() -> dict:
    return spawn_ranks(_dp_on_meta, 1, backend="gloo", timeout_s=120)[0]


# strays that are not Plait's: (variant, operation, shape) -> why
_EXPECTED = {
    ("adam", ()): "torch.optim.Adam keeps its step count as a 0-dim host tensor (unless capturable or fused)",
    ("zero1", ()): "the same Adam step count",
    ("powersgd_hook", "aten.randn.generator"): "PowerSGD's first Q is drawn on the host, then moved",
    ("powersgd_hook", "aten._to_copy.default"): "... moved to the gradient's device",
}


def _unexpected(name: str, strays: list) -> list:
    return [s for s in strays if (name, s[0]) not in _EXPECTED and (name, s[2]) not in _EXPECTED]


@pytest.mark.parametrize("name", list(DP_VARIANTS))
def test_data_parallel_step_creates_nothing_off_the_model_device(dp_on_meta, name):
    result = dp_on_meta[name]
    assert result["buckets"] >= 2
    assert result["loss"] == "meta"  # the loss accumulator followed the model (it was a CPU scalar)
    assert _unexpected(name, result["strays"]) == []


# ---- a two-stage pipeline on meta, the stages on two threads with point-to-point through queues --------------------
class QueueP2P:
    """torch.distributed's send/recv/isend/irecv between threads (one thread per rank), for a run without a group."""

    class _Done:
        def __init__(self, fn=None):
            self._fn = fn

        def wait(self):
            if self._fn is not None:
                self._fn()
                self._fn = None

    def __init__(self) -> None:
        self.local = threading.local()
        self.channels: dict[tuple[int, int], queue.Queue] = {}
        self.lock = threading.Lock()

    def _channel(self, src: int, dst: int) -> queue.Queue:
        with self.lock:
            return self.channels.setdefault((src, dst), queue.Queue())

    def isend(self, tensor, dst, group=None, tag=0):
        self._channel(self.local.rank, dst).put(tensor.detach().clone())
        return self._Done()

    def irecv(self, tensor, src, group=None, tag=0):
        channel = self._channel(src, self.local.rank)
        return self._Done(lambda: tensor.copy_(channel.get(timeout=30)))

    def send(self, tensor, dst, group=None, tag=0):
        self.isend(tensor, dst)

    def recv(self, tensor, src, group=None, tag=0):
        self.irecv(tensor, src).wait()


def test_pipeline_stages_create_nothing_off_the_stage_device(monkeypatch):
    p2p = QueueP2P()
    for name in ("isend", "irecv", "send", "recv"):
        monkeypatch.setattr(dist, name, getattr(p2p, name))
    # a meta header carries no numbers: stage 1 checks where its header buffer is, then reads the shape it would
    # have carried (micro-batches of 2 in training, 4 in inference; 16 features out of stage 0)
    headers = []

    def decode_on_meta(header):
        headers.append(header.device)
        return ((2 if len(headers) == 1 else 4, 16), torch.float32)

    monkeypatch.setattr(stage_module, "decode_header", decode_on_meta)
    modules = split_layers(_model(), [2])
    schedule = build_schedule("1f1b", 2, 4)
    results, errors = {}, []

    def run(rank: int) -> None:
        p2p.local.rank = rank
        placement = Placement(stage=rank, num_stages=2, prev_rank=rank - 1 if rank else None,
                              next_rank=rank + 1 if rank == 0 else None)
        stage = PipelineStage(modules[rank].to(META), placement, loss_fn=F.cross_entropy if rank == 1 else None)
        inputs = torch.empty(8, 12, device=META) if rank == 0 else None
        targets = torch.empty(8, dtype=torch.long, device=META) if rank == 1 else None
        watch = DeviceWatch(META)
        try:
            with watch:
                record = stage.train_step(schedule, 8, inputs, targets)
                outputs = pipelined_forward(stage, 8, 2, inputs)
            results[rank] = (watch.strays, record.loss, outputs)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert results[0][0] == [] and results[1][0] == []
    assert results[1][1].device == META and results[1][2].device == META  # loss and inference outputs
    assert headers == [META, META]


def test_a_stage_without_parameters_needs_its_device():
    with pytest.raises(ValueError, match="pass device="):
        PipelineStage(nn.ReLU(), Placement(stage=0, num_stages=2, prev_rank=None, next_rank=1))


# ---- the rest of parallel/: every tensor factory names its device ------------------------------------------------
_FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "randperm",
              "as_tensor", "linspace", "eye"}
# (file, function, factory): host-side tensors on purpose
_HOST_SIDE = {
    ("checkpoints.py", "save_stage_checkpoint", "tensor"): "checkpoint contents are written from the host",
    ("pipeline_train.py", "__init__", "empty"): "the sampler's permutation indexes the host data set",
    ("pipeline_train.py", "indices", "randperm"): "the sampler's permutation indexes the host data set",
    ("sampler.py", "__init__", "empty"): "the sampler's permutation indexes the host data set",
    ("sampler.py", "_permutation", "randperm"): "the sampler's permutation indexes the host data set",
    ("train.py", "evaluate", "arange"): "indexes the host test set",
    ("train.py", "train_rank", "zeros"): "host timing and byte sums, copied to the device once per logging step",
    ("train.py", "train_rank", "tensor"): "host timing and byte sums, copied to the device once per logging step",
    ("powersgd.py", "__call__", "randn"): "the first Q is drawn on the host (one stream for every device type), "
                                          "then moved to the gradient's device",
}


def test_every_tensor_factory_in_parallel_names_its_device():
    root = Path(plait.parallel.__file__).parent
    unnamed = []
    for path in sorted(root.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in _FACTORIES and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch"
                        and not any(k.arg == "device" for k in node.keywords)
                        and (path.name, fn.name, node.func.attr) not in _HOST_SIDE):
                    unnamed.append(f"{path.relative_to(root)}:{node.lineno} in {fn.name}: {ast.unparse(node)}")
    assert unnamed == []


_LITERALS = ('device("cpu"', 'device("cuda"', "device('cpu'", "device('cuda'", 'device="cpu"', 'device="cuda',
             ".cuda()")


def test_no_device_is_hard_coded_outside_device_py():
    root = Path(plait.parallel.__file__).parent
    found = [f"{path.relative_to(root)}:{i}" for path in sorted(root.rglob("*.py")) if path.name != "device.py"
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if any(literal in line for literal in _LITERALS)]
    assert found == []
