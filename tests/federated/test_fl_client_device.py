"""Where simulated clients train (`fl.device`, federated/device.py): "auto" | "cpu" | "cuda" resolved once at start,
"cuda" without a GPU a config error naming the setting, a torchrun rank on its own GPU, and a CPU run unchanged.
The same runs on a GPU are in tests/gpu/test_fl_cuda.py."""

from __future__ import annotations

import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.device import model_device, rank_device, resolve_device
from plait.federated.net.config import client_device
from plait.federated.simulation import build_server
from plait.settings.config import ConfigError, from_dict
from tests_support import shapes_config

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")


@no_gpu
def test_auto_is_the_cpu_and_cuda_is_an_error_naming_the_setting():
    assert resolve_device("auto", "fl.device") == torch.device("cpu")
    assert resolve_device("cpu", "fl.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match="fl.device = 'cuda' but this process sees no CUDA device"):
        resolve_device("cuda", "fl.device")
    with pytest.raises(ConfigError, match="net.client_device = 'cuda'"):  # the network client's, same rule
        client_device("cuda")
    with pytest.raises(ConfigError, match="fl.device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        resolve_device("gpu", "fl.device")


def test_a_torchrun_rank_takes_its_own_gpu(monkeypatch):
    # Prepare: a node with two GPUs, as torch reports it (no GPU is touched: only torch.device objects are made)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # Execute / Assert
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("auto", "fl.device") == torch.device("cuda", 1)
    assert rank_device("cpu", "fl.device") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")  # more ranks than GPUs on the node
    assert rank_device("auto", "fl.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match="fl.device = 'cuda' asks for GPU 2 .* this node has 2"):
        rank_device("cuda", "fl.device")


def test_the_setting_is_checked_by_the_config():
    assert from_dict(FederatedRunConfig, {}).fl.device == "auto"
    with pytest.raises(ConfigError, match="device"):
        from_dict(FederatedRunConfig, {"fl": {"device": "gpu"}})


@no_gpu
def test_cuda_without_a_gpu_stops_the_run_at_start(tmp_path):
    config = from_dict(FederatedRunConfig, shapes_config(tmp_path, device="cuda"))
    with pytest.raises(ConfigError, match="fl.device = 'cuda'"):
        run_federated(config, show_progress=False)
    assert not (tmp_path / "runs").exists()  # before any run directory is written


def _rounds(raw: dict, rounds: int = 3) -> tuple[torch.Tensor, list[dict]]:
    server = build_server(from_dict(FederatedRunConfig, raw))
    try:
        assert model_device(server.model) == torch.device("cpu")
        state, records = server.initial_state(), []
        for _ in range(rounds):
            state, record = server.run_round(state)
            records.append({k: v for k, v in record.items() if k != "wall_s"})
    finally:
        server.close()
    return state.params, records


@no_gpu
@pytest.mark.parametrize("extra", [{"buffers": "local"}, {"gossip": {"topology": "ring"}}],
                         ids=["local_buffers", "gossip"])
def test_a_cpu_run_equals_the_default_run_exactly(tmp_path, extra):
    # Prepare: federated evaluation too, so every place a model trains or evaluates is run
    raw = shapes_config(tmp_path, rounds=3, federated_eval_every=2, **extra)
    # Execute
    default_params, default_records = _rounds(raw)
    cpu_params, cpu_records = _rounds({**raw, "fl": {**raw["fl"], "device": "cpu"}})
    # Assert
    assert torch.equal(cpu_params, default_params)
    assert cpu_records == default_records
    assert "test_accuracy" in cpu_records[-1]
