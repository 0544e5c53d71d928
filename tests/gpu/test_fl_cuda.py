"""The federated simulator's clients on CUDA (`fl.device = "cuda"`): sequential, process-pool and gossip runs, and a
torchrun-style rank, end where the CPU run ends (to 1e-4), with the global state on the CPU. Skipped without CUDA.
Run: `pytest -q tests/gpu/test_fl_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.device import model_device
from plait.federated.simulation import build_server
from plait.settings.config import from_dict
from tests_support import shapes_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_convolutions():
    # cuDNN convolutions default to TF32 on Ampere and later (10-bit mantissa): a comparison with the CPU to 1e-4
    # needs full fp32. Matrix products are fp32 by default already.
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _raw(tmp_path, device: str, **fl) -> dict:
    raw = shapes_config(tmp_path, name=f"{device}-{len(fl)}", rounds=3, federated_eval_every=3, device=device, **fl)
    raw["model"]["options"] = {"dropout": 0.0}  # dropout masks come from the device's own generator
    return raw


def _rounds(raw: dict) -> tuple[torch.Tensor, dict, str]:
    server = build_server(from_dict(FederatedRunConfig, raw))
    try:
        where = str(model_device(server.model))
        state = server.initial_state()
        for _ in range(raw["fl"]["rounds"]):
            state, record = server.run_round(state)
    finally:
        server.close()
    return state.params, record, where


@pytest.mark.parametrize("fl", [{}, {"executor": "process_pool", "workers": 2}, {"buffers": "local"},
                                {"gossip": {"topology": "ring"}}],
                         ids=["sequential", "process_pool", "local_buffers", "gossip"])
def test_a_cuda_run_matches_the_cpu_run(tmp_path, fl):
    cpu_params, cpu_record, cpu_where = _rounds(_raw(tmp_path, "cpu", **fl))
    cuda_params, cuda_record, cuda_where = _rounds(_raw(tmp_path, "cuda", **fl))
    assert (cpu_where, cuda_where) == ("cpu", f"cuda:{torch.cuda.current_device()}")
    assert cuda_params.device.type == "cpu"  # the global state stays on the CPU
    torch.testing.assert_close(cuda_params, cpu_params, rtol=1e-4, atol=1e-4)
    for key in ("test_loss", "train_loss", "fed_loss"):
        if key in cpu_record:
            assert cuda_record[key] == pytest.approx(cpu_record[key], abs=1e-4), key
    for key in ("test_accuracy", "fed_accuracy"):  # an example on the decision boundary may flip: 1 in 600
        if key in cpu_record:
            assert cuda_record[key] == pytest.approx(cpu_record[key], abs=0.005), key


def test_auto_trains_on_the_gpu_and_the_run_directory_is_complete(tmp_path):
    summary = run_federated(from_dict(FederatedRunConfig, _raw(tmp_path, "auto")), show_progress=False)
    weights = load_file(str(summary.run_dir / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in weights.values())
    assert summary.final["test_accuracy"] > 0.8  # 0.98 on the CPU


def _rank(rank: int, world_size: int, raw: dict) -> list[float]:
    from plait.runtime.checkpoint import load_checkpoint

    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    return load_checkpoint(summary.run_dir / "checkpoint.pt")["params"].tolist()  # by value: the rank exits


def test_a_torchrun_rank_on_auto_trains_over_nccl_and_ends_where_the_cpu_run_ends(tmp_path):
    from plait.parallel.launch import spawn_ranks
    from plait.runtime.checkpoint import load_checkpoint

    cpu = run_federated(from_dict(FederatedRunConfig, _raw(tmp_path, "cpu")), show_progress=False)
    got = spawn_ranks(_rank, 1, _raw(tmp_path, "auto", executor="distributed"), backend="nccl", timeout_s=200)[0]
    expected = load_checkpoint(cpu.run_dir / "checkpoint.pt")["params"]
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-4)
