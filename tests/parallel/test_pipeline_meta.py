"""`parallel.build = "meta"` and `split_pipeline(build="meta")`: the model is built on the meta device and each rank
materialises only its stage; the pipelined run trains as one process whose model `materialise` initialised with the
same seed, and no rank ever holds another stage's weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.experiment.runs import pipeline
from plait.parallel import split_pipeline
from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline.config import ModelSection, ParallelSection, PipelineRunConfig
from plait.parallel.pipeline.meta_init import build_on_meta, init_layer, materialise, stage_layer_indices
from plait.parallel.pipeline.model import build_pipeline_model, preset_layer_init
from plait.parallel.pipeline_train import SeededBatches, check_config_code, load_data
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict

STEPS, BATCH, LR, MOMENTUM, SEED = 4, 12, 0.1, 0.9, 5


def user_sequential() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.LayerNorm(24), nn.Linear(24, 24),
                         nn.Tanh(), nn.Linear(24, 4))


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return torch.randn(STEPS, BATCH, 10, generator=gen), torch.randint(0, 4, (STEPS, BATCH), generator=gen)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _meta_loop(rank: int, world_size: int) -> dict:
    x, y = _batches()
    model = build_on_meta(user_sequential)  # kept here, to see which layers stayed shapes only
    pipe = split_pipeline(model, loss_fn=F.cross_entropy, build="meta", seed=SEED, micro_batches=3)
    opt = torch.optim.SGD(pipe.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        opt.zero_grad()
        pipe.step(x[step], y[step] if pipe.is_last else None)
        opt.step()
    held = set(stage_layer_indices(pipe.boundaries, len(model), rank, world_size))
    out = {"params": _flat(pipe.parameters()).numpy(), "boundaries": pipe.boundaries,
           "others_on_meta": all(p.is_meta for i, layer in enumerate(model) if i not in held
                                 for p in layer.parameters()),
           "mine_real": all(not p.is_meta for p in pipe.parameters())}
    from_function = split_pipeline(user_sequential, loss_fn=F.cross_entropy, build="meta", seed=SEED)
    out["from_function"] = _flat(from_function.parameters()).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split_pipeline(user_sequential(), loss_fn=F.cross_entropy, seed=3)
    out["seed_ignored"] = [str(w.message) for w in caught]
    for name, kwargs in {"real": dict(model=user_sequential(), build="meta"),
                         "no_reset": dict(model=lambda: nn.Sequential(nn.Linear(4, 4), NoReset()), build="meta"),
                         "function_full": dict(model=user_sequential, build="full"),
                         "unknown": dict(model=user_sequential, build="lazy")}.items():
        try:
            split_pipeline(loss_fn=F.cross_entropy, **kwargs)
        except ValueError as err:
            out[name] = str(err)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(_meta_loop, 2, timeout_s=180)


def test_split_pipeline_built_on_meta_trains_as_one_process_from_the_same_init(ranks):
    x, y = _batches()
    model = build_on_meta(user_sequential)
    materialise(model, seed=SEED)  # the single-process reference: the same function on the whole model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
    stitched = torch.cat([torch.from_numpy(ranks[0]["params"]), torch.from_numpy(ranks[1]["params"])])
    torch.testing.assert_close(stitched, _flat(model.parameters()), atol=1e-6, rtol=0)


def test_a_rank_materialises_its_stage_only(ranks):
    for rank in ranks:
        assert rank["others_on_meta"] and rank["mine_real"]
    # a function builds the model on meta: the same initial weights as a model built there by hand
    model = build_on_meta(user_sequential)
    materialise(model, seed=SEED)
    initial = _flat(model.parameters())
    stitched = torch.cat([torch.from_numpy(ranks[0]["from_function"]), torch.from_numpy(ranks[1]["from_function"])])
    torch.testing.assert_close(stitched, initial, atol=0, rtol=0)


@pytest.mark.parametrize(("case", "message"), [
    ("real", "split_pipeline(build='meta') needs the model on the meta device"),
    ("no_reset", "split_pipeline(build='meta'): layer 1 is a NoReset holding parameters or buffers but no "
                 "reset_parameters()"),
    ("function_full", "split_pipeline(build='full') takes the model itself"),
    ("unknown", "split_pipeline(build='lazy') is unknown"),
])
def test_split_pipeline_refusals_name_the_option(ranks, case, message):
    assert message in ranks[0][case]


def test_a_seed_without_meta_is_ignored_with_a_warning(ranks):
    assert any("split_pipeline(seed=3) is ignored with build='full'" in m for m in ranks[0]["seed_ignored"])


def test_a_layer_initialises_from_its_seed_and_index_alone():
    alone = build_on_meta(user_sequential)
    init_layer(alone[4], seed=SEED, index=4)
    whole = build_on_meta(user_sequential)
    materialise(whole, seed=SEED)
    assert torch.equal(alone[4].weight, whole[4].weight) and alone[0].weight.is_meta
    assert not torch.equal(whole[2].weight, whole[4].weight)  # same shape, another index: another draw
    materialise(alone, seed=SEED + 1, indices=[2])
    assert not torch.equal(alone[2].weight, whole[2].weight)


def test_stage_layer_indices_with_chunks_per_rank():
    assert stage_layer_indices([3], 7, 0, 2) == [0, 1, 2] and stage_layer_indices([3], 7, 1, 2) == [3, 4, 5, 6]
    assert stage_layer_indices([2, 4, 6], 8, 1, 2) == [2, 3, 6, 7]  # virtual stages 1 and 3


def test_meta_with_time_partition_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match=r"parallel.build = 'meta' cannot be combined with parallel.partition = "
                                         r"'time'"):
        ParallelSection(build="meta", partition="time")
    with pytest.raises(ValueError, match="parallel.build"):
        from_dict(PipelineRunConfig, {"parallel": {"build": "lazy"}})


PRESET = """
[run]
name = "{name}"
root = "{root}"
seed = 3
[model]
name = "mlp"
depth = 3
hidden = 16
[data]
batch_size = 12
[train]
steps = 3
lr = 0.05
log_every = 1
eval_every = 0
eval_examples = 100
checkpoint_every = 0
[parallel]
stages = 2
micro_batches = 3
build = "meta"
"""


def _pipelined(run_dir: Path, steps: int) -> torch.Tensor:
    stages = [load_checkpoint(run_dir / f"stage{s}.step{steps}.pt")["model"] for s in (0, 1)]
    return torch.cat([t.reshape(-1) for stage in stages for t in stage.values()])


def _reference(config: PipelineRunConfig, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One process: the whole model, built on meta and materialised by the same function, the same batches."""
    torch.manual_seed(config.run.seed)
    model = build_on_meta(lambda: build_pipeline_model(config.model))
    materialise(model, seed=config.run.seed, extra=preset_layer_init(config.model, len(model)))
    opt = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=config.train.momentum)
    batches = SeededBatches(len(y), config.data.batch_size, config.run.seed)
    for step in range(config.train.steps):
        idx = batches.indices(step)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return _flat(model.parameters())


@pytest.mark.slow  # about 10 s: the user-model and split_pipeline meta tests cover the same path in the default suite
def test_a_meta_built_preset_trains_as_one_process(tmp_path):
    path = tmp_path / "meta.toml"
    path.write_text(PRESET.format(name="meta", root=tmp_path / "runs"))
    pipeline.main(path, nproc=2, resume=False, overrides=[], allreduce=None)
    config = pipeline.load_config(path, [])
    data = load_data(config)
    reference = _reference(config, data.prepare(data.sets.train_x), data.sets.train.y)
    torch.testing.assert_close(_pipelined(tmp_path / "runs" / "meta", 3), reference, atol=1e-6, rtol=0)
    # interleaved: each rank materialises its two chunks (virtual stages s and s + 2), the same weights again
    pipeline.main(path, nproc=2, resume=False, allreduce=None,
                  overrides=["run.name=chunks", "parallel.schedule=interleaved_1f1b", "parallel.micro_batches=4"])
    stages = [load_checkpoint(tmp_path / "runs" / "chunks" / f"stage{s}.step3.pt")["model"] for s in (0, 1)]
    # the model's order: chunk 0 of stage 0, of stage 1, then chunk 1 of each (each in its state dict's order)
    chunked = torch.cat([tensor.reshape(-1) for chunk in (0, 1) for stage in stages for key, tensor in stage.items()
                         if key.startswith(f"{chunk}.")])
    torch.testing.assert_close(chunked, reference, atol=1e-6, rtol=0)
    # the He init survives the meta build: the hidden layers' spread is sqrt(2 / fan_in), not PyTorch's default
    torch.manual_seed(0)
    model = build_on_meta(lambda: build_pipeline_model(config.model))
    materialise(model, seed=3, extra=preset_layer_init(config.model, len(model)))
    assert float(model[3].weight.detach().std()) == pytest.approx((2 / 16) ** 0.5, rel=0.2)


USER_CODE = '''
from torch import nn


def make_net(hidden: int = 16):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        import torch
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def make_unresettable():
    return nn.Sequential(nn.Linear(4, 3), Scale())
'''


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("meta_user")
    (folder / "metanet.py").write_text(USER_CODE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)).astype(np.int64)
    np.savez(folder / "data.npz", x=x[:48], y=y[:48], test_x=x[48:], test_y=y[48:])
    return folder


def _user_config(code: Path, factory: str, name: str) -> dict:
    return {"run": {"name": name, "root": str(code / "runs"), "seed": SEED},
            "model": {"factory": f"{code / 'metanet.py'}:{factory}"},
            "data": {"source": str(code / "data.npz"), "batch_size": BATCH},
            "train": {"steps": STEPS, "lr": LR, "momentum": MOMENTUM, "log_every": 1, "eval_every": 0,
                      "checkpoint_every": 0},
            "parallel": {"stages": 2, "micro_batches": 3, "build": "meta"}}


def test_a_meta_built_user_sequential_from_a_config_trains_as_one_process(code):
    text = "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
                     for section, values in _user_config(code, "make_net", "usermeta").items())
    path = code / "usermeta.toml"
    path.write_text(text.replace("'", '"'))
    pipeline.main(path, nproc=2, resume=False, overrides=[], allreduce=None)
    config = pipeline.load_config(path, [])
    with np.load(code / "data.npz") as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    torch.testing.assert_close(_pipelined(code / "runs" / "usermeta", STEPS), _reference(config, x, y), atol=1e-6,
                               rtol=0)


def test_a_user_layer_without_reset_parameters_is_named_at_start(code):
    config = from_dict(PipelineRunConfig, _user_config(code, "make_unresettable", "bad"))
    with pytest.raises(ValueError, match=r"parallel.build = 'meta': layer 1 is a Scale holding parameters or "
                                         r"buffers but no reset_parameters\(\)"):
        check_config_code(config)


def test_the_preset_init_hook_is_only_for_the_mlp():
    assert preset_layer_init(ModelSection(name="cnn"), 10) is None
    assert preset_layer_init(ModelSection(name="mlp"), 10) is not None
