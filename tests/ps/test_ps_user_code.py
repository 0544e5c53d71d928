"""`plait train CONFIG.toml` on parameter servers with the user's own model and data, named in the config: under BSP
with one server, two workers end where single-process SGD on their batches ends; a regression task trains with MSE;
a bad reference stops the run at start, naming the setting, before the run directory exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.experiment.runs.parameter_server import run_ps
from plait.ps.config import PSRunConfig
from plait.ps.trainer import build_flat_model, check_config_code, load_split, loss_and_grad
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import from_dict

USER_CODE = '''
import numpy as np
from torch import nn


def make_net(hidden: int = 12):
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def make_regressor():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def load_targets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] - 2 * x[:, 1] * x[:, 2]).astype(np.float32)}


def make_pair():
    return nn.Linear(3, 2)  # two outputs for one real-valued target
'''


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ps_user")
    (folder / "ps_usernet.py").write_text(USER_CODE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) * 2 + (x[:, 2] > 0)  # classes 0..3
    np.savez(folder / "train.npz", x=x[:80], y=y[:80])
    np.savez(folder / "test.npz", x=x[80:], y=y[80:])
    return folder


def _config(code, name: str, factory: str, source: str, **train) -> PSRunConfig:
    data = {"source": source, "test_examples": 0}
    if source.endswith(".npz"):
        data["test_path"] = str(code / "test.npz")
    return from_dict(PSRunConfig, {
        "run": {"root": str(code / "runs"), "name": name, "seed": 2},
        "model": {"factory": f"{code / 'ps_usernet.py'}:{factory}"}, "data": data,
        "train": {"steps": 6, "batch_size": 8, "eval_every_s": 0.2, **train},
        "sync": {"servers": 1, "consistency": "bsp"}, "optimizer": {"name": "sgd", "lr": 0.1}})


def _single_process_sgd(config: PSRunConfig, num_workers: int) -> np.ndarray:
    model, weights, spec = build_flat_model(config)
    shards = [load_split(config, "train", rank, num_workers) for rank in range(num_workers)]
    for step in range(config.train.steps):
        grads = []
        for rank, data in enumerate(shards):
            rng = np.random.default_rng([config.run.seed, rank, step])
            idx = torch.from_numpy(rng.integers(0, len(data.y), config.train.batch_size))
            grads.append(loss_and_grad(model, spec, weights, data.x[idx], data.y[idx], config.train.task)[1])
        weights -= config.optimizer.lr * torch.stack(grads).mean(0)
    return weights.numpy()


def test_bsp_trains_the_users_model_on_the_users_npz_as_single_process_sgd(code):
    config = _config(code, "classes", "make_net", str(code / "train.npz"))
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert summary.failed_workers == []
    np.testing.assert_allclose(summary.weights, _single_process_sgd(config, 2), rtol=0, atol=2e-6)
    assert not np.allclose(summary.weights, build_flat_model(config)[1].numpy(), atol=1e-3)  # it did train
    final = summary.final  # evaluated on data.test_path
    assert final["step"] == 6 and 0 <= final["test_accuracy"] <= 1 and final["test_loss"] > 0


def test_a_regression_without_a_test_set_trains_with_mse(code):
    config = _config(code, "regression", "make_regressor", f"{code / 'ps_usernet.py'}:load_targets",
                     task="regression")
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    np.testing.assert_allclose(summary.weights, _single_process_sgd(config, 2), rtol=0, atol=2e-6)
    evaluations = [r for r in read_metrics(code / "runs" / "regression" / "metrics.jsonl") if "event" not in r]
    assert evaluations and not any("test_loss" in r or "test_accuracy" in r for r in evaluations)  # no test set


@pytest.mark.parametrize(("factory", "source", "train", "message"), [
    ("make_nett", "train.npz", {}, "has no 'make_nett'"),
    ("make_regressor", "train.npz", {}, "the data's labels go up to 3 but the model has 1 outputs"),
    ("make_net", "train.npz", {"task": "regression"}, "train.task = 'regression' needs float targets"),
    ("make_pair", "ps_usernet.py:load_targets", {"task": "regression"},
     "model.factory: the model's output does not fit the task's loss"),
    ("make_net", "ps_usernet.py:load_targets", {}, "train.task = 'classification' needs integer class labels"),
    ("make_regressor", "ps_usernet.py:load_targets", {"task": "regression", "target_loss": 0.1},
     "train.target_loss needs a test set"),
])
def test_each_bad_reference_is_named_before_the_run_directory_exists(code, factory, source, train, message):
    source = str(code / source) if source.endswith(".npz") else f"{code}/{source}"
    config = _config(code, "bad", factory, source, **train)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config_code(config)
    with pytest.raises(ValueError):
        run_ps(config, num_workers=2, timeout_s=60, show_progress=False)
    assert not (code / "runs" / "bad").exists()
