"""The cluster trainers' optimizer choice and its flat state: a checkpointed-and-restored optimizer continues
exactly as the original would have, and bad settings name the key."""

from __future__ import annotations

import pytest
import torch

from plait.parallel.config import DataParallelRunConfig
from plait.parallel.optim import build_optimizer, flat_state, load_flat_state
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.settings.config import from_dict


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def _step(optimizer, params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()


@pytest.mark.parametrize("name,keys", [("sgd", {"momentum_buffer"}), ("adam", {"step", "exp_avg", "exp_avg_sq"}),
                                        ("adamw", {"step", "exp_avg", "exp_avg_sq"})])
def test_flat_state_round_trip_continues_bit_identically(name, keys):
    settings = dict(lr=0.01, momentum=0.9, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)
    original = _params(0)
    opt = build_optimizer(original, name, **settings)
    assert flat_state(opt, original) == {}  # no state before the first step
    for seed in range(3):
        _step(opt, original, seed)
    flat = flat_state(opt, original)
    assert set(flat) == keys
    for key, value in flat.items():
        assert value.shape == (() if key == "step" else (17,))  # 3·4 + 5 elements, end to end
    if name != "sgd":
        assert float(flat["step"]) == 3
        torch.testing.assert_close(flat["exp_avg"][12:], opt.state[original[1]]["exp_avg"])
    restored = [torch.nn.Parameter(p.detach().clone()) for p in original]
    opt2 = build_optimizer(restored, name, **settings)
    load_flat_state(opt2, restored, flat)
    _step(opt, original, 9)
    _step(opt2, restored, 9)
    for a, b in zip(original, restored):
        assert torch.equal(a, b)


def test_adam_differs_from_sgd_and_adamw_decays_apart_from_the_gradient():
    # one step from w = 1 with gradient 0: Adam's weight decay enters the moments, AdamW's scales w directly
    results = {}
    for name in ("sgd", "adam", "adamw"):
        w = torch.nn.Parameter(torch.ones(1))
        opt = build_optimizer([w], name, lr=0.1, weight_decay=0.5)
        w.grad = torch.zeros(1)
        opt.step()
        results[name] = float(w.detach())
    assert results["sgd"] == pytest.approx(1 - 0.1 * 0.5)          # w - lr·wd·w
    assert results["adam"] == pytest.approx(1 - 0.1, rel=1e-5)      # first Adam step: lr·sign of (wd·w)
    assert results["adamw"] == pytest.approx(1 - 0.1 * 0.5)         # w·(1 - lr·wd), then a zero Adam step


def test_bad_optimizer_settings_name_the_key():
    with pytest.raises(ValueError, match="train.optimizer = 'lamb' is unknown"):
        from_dict(DataParallelRunConfig, {"train": {"optimizer": "lamb"}})
    with pytest.raises(ValueError, match="train.beta1 must be in"):
        from_dict(PipelineRunConfig, {"train": {"optimizer": "adam", "beta1": -0.1}})
    with pytest.raises(ValueError, match="train.eps must be > 0"):
        from_dict(DataParallelRunConfig, {"train": {"eps": 0}})
    params = _params(1)
    opt = build_optimizer(params, "adam", lr=0.1)
    _step(opt, params, 0)
    with pytest.raises(ValueError, match="'exp_avg' holds 17 values, the parameters 12"):
        load_flat_state(build_optimizer(params[:1], "adam", lr=0.1), params[:1], flat_state(opt, params))


def test_config_sections_build_their_components_once_from_their_settings():
    """The trainer is handed built components: each section turns its strings into one, with its settings."""
    from plait.core.compress import Fp16Codec, TopKCodec
    from plait.parallel.powersgd import PowerSGDHook

    config = from_dict(DataParallelRunConfig, {"train": {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1},
                                               "compression": {"codec": "topk", "ratio": 0.2}})
    optimizer = config.train.build_optimizer(_params(0))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.1
    compressor = config.compression.build(seed=3)
    assert isinstance(compressor.codec, TopKCodec) and compressor.codec.ratio == 0.2 and compressor.error_feedback
    assert config.comm_hook.build(seed=0) is None  # "none": the trainer's own sync

    fp16 = from_dict(DataParallelRunConfig, {"compression": {"codec": "fp16", "error_feedback": False}})
    assert isinstance(fp16.compression.build(seed=0).codec, Fp16Codec)
    assert from_dict(DataParallelRunConfig, {}).compression.build(seed=0) is None
    hook = from_dict(DataParallelRunConfig, {"comm_hook": {"name": "powersgd", "rank": 3}}).comm_hook.build(seed=1)
    assert isinstance(hook, PowerSGDHook) and hook.rank == 3

    stage = from_dict(PipelineRunConfig, {"train": {"lr": 0.2}}).train.build_optimizer(_params(1))
    assert isinstance(stage, torch.optim.SGD) and stage.defaults["momentum"] == 0.9 and stage.defaults["lr"] == 0.2
