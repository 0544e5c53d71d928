"""Compression inside the FL round: bytes_up reflects the codec, error feedback per client, config keys."""

import numpy as np
import pytest
import torch
from torch import nn

from plait.data.federated import FederatedData
from plait.federated.config import FederatedRunConfig, FLConfig
from plait.federated.executor import SequentialExecutor
from plait.federated.pipeline import ClientStages, CompressionConfig
from plait.federated.privacy import PrivacyConfig
from plait.federated.server import FederatedServer
from plait.settings.config import ConfigError, from_dict


def _server(compression: dict, strategy=None, attack=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    parts = [np.arange(i * 20, (i + 1) * 20) for i in range(10)]
    data = FederatedData(x, y, x[:50], y[:50], parts, 0.0, 0, num_classes=2)
    config = from_dict(FLConfig, {"rounds": 3, "fraction": 0.5, "min_clients": 1, "compression": compression,
                                  "strategy": strategy or {}, "attack": attack or {},
                                  "plan": {"batch_size": 0, "lr": 0.5}})
    torch.manual_seed(0)
    return FederatedServer(config, nn.Linear(4, 10), data, SequentialExecutor(), seed=0)


@pytest.mark.parametrize("codec,bytes_per_client", [("none", 50 * 4), ("fp16", 50 * 2), ("int8", 50 + 4),
                                                    ("topk", 5 * 8), ("randk", 8 + 5 * 4)])
def test_bytes_up_reflects_the_codec(codec, bytes_per_client):
    server = _server({"codec": codec, "ratio": 0.1})  # the model has 4·10 + 10 = 50 parameters
    state, record = server.run_round(server.initial_state())
    assert record["participants"] == 5
    assert record["bytes_up"] == 5 * bytes_per_client
    assert record["bytes_down"] == 5 * 50 * 4


def test_fp16_round_stays_close_to_uncompressed():
    plain = _server({})
    half = _server({"codec": "fp16"})
    a, _ = plain.run_round(plain.initial_state())
    b, _ = half.run_round(half.initial_state())
    assert torch.allclose(a.params, b.params, atol=1e-3) and not torch.equal(a.params, b.params)


def test_error_feedback_residual_per_client():
    stages = ClientStages(PrivacyConfig(), CompressionConfig(codec="topk", ratio=0.25, error_feedback=True), seed=0)
    delta = torch.tensor([4.0, 3.0, 2.0, 1.0])
    first = stages.decode(7, stages.encode(7, delta, 1))
    assert first.tolist() == [4.0, 0.0, 0.0, 0.0]
    again = stages.decode(7, stages.encode(7, delta, 2))  # residual [0, 3, 2, 1] + delta → 6 is largest
    assert again.tolist() == [0.0, 6.0, 0.0, 0.0]
    other = stages.decode(8, stages.encode(8, delta, 2))  # another client has its own (empty) residual
    assert other.tolist() == [4.0, 0.0, 0.0, 0.0]


def test_robust_strategy_under_sign_flip_in_the_round():
    server = _server({}, strategy={"name": "median"}, attack={"kind": "sign_flip", "fraction": 0.2})
    assert len(server.backend.attackers) == 2
    state, record = server.run_round(server.initial_state())
    assert record["participants"] == 5 and 0 <= record["attackers"] <= 2


def test_config_sections_from_toml_tables():
    config = from_dict(FederatedRunConfig, {"fl": {
        "strategy": {"name": "fedavg", "weighting": "uniform"},
        "server_opt": {"name": "adam", "lr": 0.01, "tau": 0.001},
        "privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "epsilon_budget": 10.0},
        "compression": {"codec": "qsgd", "levels": 8},
        "attack": {"kind": "label_flip", "fraction": 0.1}}})
    assert config.fl.compression.build().levels == 8 and config.fl.server_opt.name == "adam"
    with pytest.raises(ConfigError, match="unknown config key 'fl.compression.bits'"):
        from_dict(FederatedRunConfig, {"fl": {"compression": {"bits": 4}}})
    with pytest.raises(ConfigError, match="compression.ratio"):
        from_dict(FederatedRunConfig, {"fl": {"compression": {"codec": "topk", "ratio": 2.0}}})
    with pytest.raises(ConfigError, match="not allowed"):
        from_dict(FederatedRunConfig, {"fl": {"attack": {"kind": "backdoor"}}})
