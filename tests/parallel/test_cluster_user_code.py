"""`plait train CONFIG.toml` for data parallelism and the pipeline with the user's own model and data, named in the
config (`model = "usernet.py:make_net"`, `data = "data.npz"` or a loader): a run under 2 real gloo ranks ends where
one process training on the same batches ends, and every bad reference stops the run at start, naming the setting,
with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plait.experiment.runs import data_parallel, pipeline
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline_train import SeededBatches
from plait.parallel.pipeline_train import check_config_code as check_pipeline
from plait.parallel.sampler import ShardedSampler
from plait.parallel.train import check_config_code as check_data_parallel
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import from_dict, load_toml
from plait.user_code import resolve

USER_CODE = '''
import numpy as np
import torch
from torch import nn


def make_net(hidden: int = 16, classes: int = 3):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes))


def make_regressor(hidden: int = 8):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def load_clients():
    """Three clients' sets with real-valued targets: pooled into one training set, no test split."""
    rng = np.random.default_rng(5)
    clients = []
    for count in (40, 30, 26):
        x = rng.normal(size=(count, 4)).astype(np.float32)
        clients.append({"x": x, "y": (np.sin(x[:, 0]) + x[:, 1] * x[:, 2]).astype(np.float32)})
    return clients


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def make_branchy():
    return Branchy()


def make_number():
    return 3


def make_broken():
    raise RuntimeError("no GPU here")


def load_broken():
    raise OSError("database down")


def make_wrong_width():
    return nn.Sequential(nn.Linear(5, 3))


def make_two_outputs():
    return nn.Sequential(nn.Linear(4, 2))


def make_one_layer():
    return nn.Sequential(nn.Linear(4, 3))
'''
LR, MOMENTUM, SEED = 0.1, 0.9, 4


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A folder holding the user's module and data files (one module for the whole file: it is imported once)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "usernet.py").write_text(USER_CODE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)).astype(np.int64)  # classes 0, 1, 2
    np.savez(folder / "data.npz", x=x[:96], y=y[:96], test_x=x[96:], test_y=y[96:])
    return folder


def _config(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text.format(root=(folder / "runs").as_posix(), name=name, seed=SEED))
    return path


def _user(folder: Path, name: str):
    return resolve(f"{folder / 'usernet.py'}:{name}", "test")


def _reference_data_parallel(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int,
                             batch_size: int) -> torch.Tensor:
    """One process, the combined batch of both ranks at each step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sampler = ShardedSampler(len(y), batch_size=batch_size, accumulate=1, rank=0, world_size=2, seed=SEED)
    for step in range(1, steps + 1):
        idx = sampler.step_indices(step).reshape(-1)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


DP_CONFIG = """
data = "{data}"
[model]
factory = "usernet.py:make_net"
options = {{{{ hidden = 8 }}}}
[run]
name = "{{name}}"
root = "{{root}}"
seed = {{seed}}
[train]
steps = 6
batch_size = 8
lr = 0.1
momentum = 0.9
log_every = 1
checkpoint_every = 0
"""


def test_data_parallel_trains_the_users_model_on_the_users_npz_as_one_process_would(code):
    config = _config(code, "dp", DP_CONFIG.format(data=(code / "data.npz").as_posix()))
    data_parallel.main(config, nproc=2, resume=False, overrides=[], allreduce=None)
    run_dir = code / "runs" / "dp"
    params = load_checkpoint(run_dir / "checkpoint.pt")["params"]
    with np.load(code / "data.npz") as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    torch.manual_seed(SEED)
    reference = _reference_data_parallel(_user(code, "make_net")(hidden=8), x, y, nn.functional.cross_entropy,
                                         steps=6, batch_size=8)
    torch.testing.assert_close(params, reference, atol=1e-5, rtol=0)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert 0 <= records[-1]["test_accuracy"] <= 1 and records[-1]["test_loss"] > 0  # the .npz's own test split


REGRESSION_CONFIG = """
model = "usernet.py:make_regressor"
data = "usernet.py:load_clients"
[run]
name = "{name}"
root = "{root}"
seed = {seed}
[sync]
kind = "sharded"
[train]
task = "regression"
steps = 5
batch_size = 6
lr = 0.1
momentum = 0.9
log_every = 1
checkpoint_every = 0
"""


@pytest.mark.slow
def test_a_regression_on_pooled_client_sets_matches_one_process_with_mse(code):
    """train.task = "regression": MSE; a loader's per-client sets are pooled; no test split, no test metrics."""
    config = _config(code, "regression", REGRESSION_CONFIG)
    data_parallel.main(config, nproc=2, resume=False, overrides=[], allreduce=None)
    run_dir = code / "runs" / "regression"
    params = load_checkpoint(run_dir / "checkpoint.pt")["params"]
    clients = _user(code, "load_clients")()
    x = torch.cat([torch.from_numpy(c["x"]) for c in clients])
    y = torch.cat([torch.from_numpy(c["y"]) for c in clients])
    torch.manual_seed(SEED)
    reference = _reference_data_parallel(_user(code, "make_regressor")(), x, y,
                                         lambda out, target: nn.functional.mse_loss(out.reshape(-1), target),
                                         steps=5, batch_size=6)
    torch.testing.assert_close(params, reference, atol=1e-5, rtol=0)
    assert not any("test_loss" in r for r in read_metrics(run_dir / "metrics.jsonl"))


PIPELINE_CONFIG = """
[model]
factory = "usernet.py:make_net"
[data]
source = "{data}"
batch_size = 12
[run]
name = "{{name}}"
root = "{{root}}"
seed = {{seed}}
[train]
steps = 5
lr = 0.1
momentum = 0.9
log_every = 1
eval_every = 5
checkpoint_every = 0
[parallel]
mode = "pipeline"
stages = 2
micro_batches = 3
schedule = "1f1b"
partition = "explicit"
boundaries = [2]
"""


def _pipeline_reference(code: Path, steps: int) -> torch.Tensor:
    """One process, the whole model, the same seeded batches."""
    with np.load(code / "data.npz") as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    torch.manual_seed(SEED)
    model = _user(code, "make_net")()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    batches = SeededBatches(len(y), 12, SEED)
    for step in range(steps):
        idx = batches.indices(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_the_pipeline_cuts_the_users_sequential_where_told_and_trains_as_one_process(code):
    config = _config(code, "pipe", PIPELINE_CONFIG.format(data=(code / "data.npz").as_posix()))
    pipeline.main(config, nproc=2, resume=False, overrides=[], allreduce=None)
    run_dir = code / "runs" / "pipe"
    stage0 = load_checkpoint(run_dir / "stage0.step5.pt")["model"]
    stage1 = load_checkpoint(run_dir / "stage1.step5.pt")["model"]
    assert sorted(stage0) == ["0.bias", "0.weight"]  # boundaries = [2]: Linear and Tanh on stage 0
    pipelined = torch.cat([t.reshape(-1) for t in [*stage0.values(), *stage1.values()]])
    torch.testing.assert_close(pipelined, _pipeline_reference(code, 5), atol=1e-5, rtol=0)
    tests = [r for r in read_metrics(run_dir / "metrics.jsonl") if "test_accuracy" in r]
    assert len(tests) == 1 and tests[0]["step"] == 5


@pytest.mark.slow
def test_an_interleaved_schedule_cuts_the_users_sequential_into_chunks(code):
    """parallel.chunks_per_rank = 2: five layers balanced into four virtual stages, rank s holding s and s + 2."""
    text = PIPELINE_CONFIG.format(data=(code / "data.npz").as_posix())
    text = text.replace('schedule = "1f1b"\npartition = "explicit"\nboundaries = [2]',
                        'schedule = "interleaved_1f1b"\nchunks_per_rank = 2').replace("micro_batches = 3",
                                                                                       "micro_batches = 4")
    pipeline.main(_config(code, "interleaved", text), nproc=2, resume=False, overrides=[], allreduce=None)
    run_dir = code / "runs" / "interleaved"
    pieces = []  # (virtual stage, position in the stage's state_dict, tensor); chunk c of stage s is c·2 + s
    for stage in (0, 1):
        state = load_checkpoint(run_dir / f"stage{stage}.step5.pt")["model"]
        pieces += [(int(key.split(".")[0]) * 2 + stage, i, t) for i, (key, t) in enumerate(state.items())]
    assert len({virtual for virtual, _, _ in pieces}) >= 3  # a parameter-free chunk (Tanh) has no entries
    pipelined = torch.cat([t.reshape(-1) for _, _, t in sorted(pieces, key=lambda piece: piece[:2])])
    torch.testing.assert_close(pipelined, _pipeline_reference(code, 5), atol=1e-5, rtol=0)


def _dp(code: Path, model: str = "usernet.py:make_net", data: str = "", **train) -> DataParallelRunConfig:
    text = f'model = "{model}"\ndata = "{data or (code / "data.npz").as_posix()}"\n[run]\nroot = "{code}/bad"\n'
    path = code / "bad.toml"
    path.write_text(text)
    raw = load_toml(path)
    raw["train"] = train
    return from_dict(DataParallelRunConfig, raw)


@pytest.mark.parametrize(("model", "data", "train", "message"), [
    ("nowhere.py:make_net", "", {}, "model.factory = '{code}/nowhere.py:make_net': no file"),
    ("usernet.py:make_nett", "", {}, "has no 'make_nett' (it has ["),
    ("usernet.py:make_broken", "", {}, "usernet.py:make_broken' failed: RuntimeError: no GPU here"),
    ("usernet.py:make_number", "", {}, "returned a int, not a torch.nn.Module"),
    ("usernet.py:make_wrong_width", "", {}, "model.factory: the model does not take the data's inputs"),
    ("usernet.py:make_two_outputs", "", {}, "the data's labels go up to 2 but the model has 2 outputs"),
    ("usernet.py:make_net", "", {"task": "regression"}, "train.task = 'regression' needs float targets"),
    ("usernet.py:make_regressor", "usernet.py:load_clients", {},
     "train.task = 'classification' needs integer class labels"),
    ("usernet.py:make_net", "usernet.py:load_clients", {"task": "regression"},
     "model.factory: the model's output does not fit the task's loss"),
    ("usernet.py:make_net", "missing.npz", {},
     "data.source = 'missing.npz': no such file or folder (a relative path is taken from the current directory"),
    ("usernet.py:make_net", "usernet.py:load_broken", {}, "usernet.py:load_broken' failed: OSError: database down"),
])
def test_each_bad_reference_is_named_at_start(code, model, data, train, message):
    with pytest.raises(ValueError) as err:
        check_data_parallel(_dp(code, model, data, **train))
    assert message.format(code=code) in str(err.value)


def test_a_wrong_signature_is_a_config_error_naming_the_setting(code):
    path = code / "signature.toml"
    path.write_text('[model]\nfactory = "usernet.py:make_net"\noptions = { width = 3 }\n')
    with pytest.raises(ValueError, match=r"model.factory = .*make_net': cannot be called with \['width'\]"):
        check_data_parallel(from_dict(DataParallelRunConfig, load_toml(path)))


def _pipeline(code: Path, factory: str, **parallel) -> PipelineRunConfig:
    return from_dict(PipelineRunConfig, {
        "model": {"factory": f"{code / 'usernet.py'}:{factory}"},
        "data": {"source": str(code / "data.npz"), "batch_size": 8},
        "parallel": {"stages": 2, "micro_batches": 2, **parallel}})


@pytest.mark.parametrize(("factory", "parallel", "message"), [
    ("make_branchy", {}, "make_branchy' returned a Branchy, which the pipeline cannot cut into stages"),
    ("make_one_layer", {}, "make_one_layer' gives 1 layers, fewer than parallel.stages = 2"),
    ("make_net", {"schedule": "interleaved_1f1b", "chunks_per_rank": 3, "micro_batches": 4},
     "gives 5 layers, fewer than parallel.stages × parallel.chunks_per_rank = 6"),
    ("make_net", {"partition": "explicit", "boundaries": [7]}, "parallel.boundaries = [7] must be strictly"),
])
def test_a_model_the_pipeline_cannot_cut_is_named_at_start(code, factory, parallel, message):
    with pytest.raises(ValueError) as err:
        check_pipeline(_pipeline(code, factory, **parallel))
    assert message in str(err.value)


def test_a_bad_reference_leaves_no_run_directory(code, capsys):
    """`plait train` refuses before the run directory exists: nothing half-written."""
    for name, text in [("dp-bad", DP_CONFIG.format(data=(code / "data.npz").as_posix())),
                       ("pipe-bad", PIPELINE_CONFIG.format(data=(code / "data.npz").as_posix()))]:
        config = _config(code, name, text.replace("usernet.py:make_net", "usernet.py:make_two_outputs"))
        main = pipeline.main if name == "pipe-bad" else data_parallel.main
        with pytest.raises((SystemExit, ValueError)):
            main(config, nproc=2, resume=False, overrides=[], allreduce=None)
        assert not (code / "runs" / name).exists()
    output = capsys.readouterr()  # each plane's message names the setting
    assert "error: model.factory = " in output.err and "make_two_outputs" in output.err  # data parallel's
    assert "make_two_outputs" in output.out  # the pipeline's
