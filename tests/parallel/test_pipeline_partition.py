"""Partitioning, activation accounting, micro-batch sizes and the typed config: single process, no network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.memory import ActivationMeter
from plait.parallel.pipeline.model import deep_mlp
from plait.parallel.pipeline.partition import (
    balance,
    balance_by_params,
    balance_by_time,
    check_boundaries,
    profile_layer_times,
    split_layers,
)
from plait.parallel.pipeline.stage import micro_batch_sizes
from plait.settings.config import ConfigError, from_dict


def test_balance_minimises_the_largest_stage():
    assert balance([1, 1, 1, 1], 2) == [2]
    assert balance([4, 1, 1, 1, 1], 2) == [1]          # 4 | 4
    assert balance([1, 2, 3, 4, 5], 3) == [3, 4]       # 6 | 4 | 5: bottleneck 6 is optimal
    assert balance([1, 0, 1, 0, 1, 0, 1, 0], 2) == [4]  # ReLU-like zero cost layers stay with their Linear
    assert balance([5, 5, 5], 3) == [1, 2]
    with pytest.raises(ValueError, match="parallel.stages = 4"):
        balance([1, 1, 1], 4)


def test_balance_by_params_on_a_deep_mlp():
    model = deep_mlp(depth=5, hidden=32, in_features=32)  # five Linear(32·32+32) after a Flatten
    stages = split_layers(model, balance_by_params(model, 5))
    assert [sum(p.numel() for p in s.parameters()) for s in stages] == [32 * 32 + 32] * 4 + [32 * 10 + 10]
    assert stages[0][1] is model[1]  # stages share the model's layers, no copy


def test_explicit_boundaries_are_checked():
    model = deep_mlp(depth=3, hidden=8, in_features=8)    # 6 layers
    assert [len(s) for s in split_layers(model, [2, 4])] == [2, 2, 2]
    with pytest.raises(ValueError, match="parallel.boundaries"):
        check_boundaries([4, 2], 6, 3)
    with pytest.raises(ValueError, match="parallel.boundaries"):
        check_boundaries([0, 3], 6, 3)
    with pytest.raises(ValueError, match="needs 2 entries"):
        check_boundaries([3], 6, 3)


def test_balance_by_time_isolates_the_slow_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 8), nn.ReLU(), nn.Linear(8, 8))
    times = profile_layer_times(model, torch.randn(256, 512), repeats=3)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert balance_by_time(model, torch.randn(256, 512), 2, repeats=3) == [1]
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no gradients behind


def test_activation_meter_counts_saved_activations_once():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    meter = ActivationMeter(layer.parameters())
    x = torch.randn(2, 4, requires_grad=True)
    with meter.recording():
        y = layer(x)
    # saved: Linear's input [2,4] (32 bytes) and ReLU's output [2,3] (24 bytes); the weight is not counted
    assert meter.live_bytes == 32 + 24
    y.sum().backward()
    assert meter.live_bytes == 0 and meter.peak_bytes == 56
    held = meter.hold(torch.zeros(10))
    assert meter.live_bytes == 40
    del held
    assert meter.live_bytes == 0


def test_micro_batch_sizes():
    assert micro_batch_sizes(10, 4) == [3, 3, 2, 2]
    assert micro_batch_sizes(8, 8) == [1] * 8
    assert [len(t) for t in torch.tensor_split(torch.arange(10), 4)] == micro_batch_sizes(10, 4)
    with pytest.raises(ValueError, match="parallel.micro_batches = 5"):
        micro_batch_sizes(4, 5)


def test_config_validation_names_the_setting():
    config = from_dict(PipelineRunConfig, {"parallel": {"mode": "model", "stages": 3}})
    assert config.parallel.micro_batches == 1
    assert from_dict(PipelineRunConfig, {"parallel": {"mode": "pipeline"}}).parallel.micro_batches == 4
    with pytest.raises(ConfigError, match="parallel.micro_batches = 4 asks for a pipeline"):
        from_dict(PipelineRunConfig, {"parallel": {"mode": "model", "micro_batches": 4}})
    with pytest.raises(ConfigError, match="parallel.boundaries"):
        from_dict(PipelineRunConfig, {"parallel": {"partition": "explicit", "stages": 3, "boundaries": [2]}})
    with pytest.raises(ConfigError, match="divisible by parallel.replicas"):
        from_dict(PipelineRunConfig, {"data": {"batch_size": 63}, "parallel": {"replicas": 2}})
    with pytest.raises(ConfigError, match="unknown config key 'parallel.stagez'"):
        from_dict(PipelineRunConfig, {"parallel": {"stagez": 2}})
    with pytest.raises(ConfigError, match="parallel.schedule"):
        from_dict(PipelineRunConfig, {"parallel": {"schedule": "zb"}})
