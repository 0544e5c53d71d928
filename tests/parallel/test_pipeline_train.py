"""`plait train CONFIG --nproc 2` for a pipeline on MNIST: run directory, metrics, checkpoints, and --resume
ending exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from plait.experiment.runs import pipeline
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.model import build_pipeline_model
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict, load_toml
from tests_support import run_plait

CONFIG = """
[run]
name = "{name}"
root = "{root}"
seed = 3
[model]
name = "mlp"
depth = 3
hidden = 32
[data]
batch_size = 16
[train]
steps = 4
lr = 0.05
log_every = 1
eval_every = 4
eval_examples = 300
checkpoint_every = 2
[parallel]
mode = "pipeline"
stages = 2
micro_batches = 3
schedule = "gpipe"
"""


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_pipeline_run_and_resume(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.format(name="whole", root=tmp_path / "runs"))
    result = run_plait("train", str(config), "--nproc", "2")
    assert result.exit_code == 0, result.output
    whole = tmp_path / "runs" / "whole"
    assert "stage 1: F0 F1 F2 B0 B1 B2" in result.output and "test accuracy" in result.output
    records = _metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert all(0 <= r["bubble"] < 1 and r["train_loss"] > 0 for r in records if "train_loss" in r)
    tests = [r for r in records if "test_accuracy" in r]
    assert len(tests) == 1 and 0 <= tests[0]["test_accuracy"] <= 1 and tests[0]["test_loss"] > 0
    assert all(r["lr"] == 0.05 and r["time"] > 1.6e9 for r in records)  # in every record: the rate, Unix time
    assert int(load_checkpoint(whole / "checkpoint.pt")["step"]) == 4
    # every plane writes through the same sinks and draws its plots
    assert list((whole / "tb").glob("events.out.tfevents.*")) and (whole / "metrics.csv").exists()
    assert (whole / "plots" / "loss.png").exists()
    # each stage keeps the last step and the one before (a rank killed between two ranks' commits resumes there)
    assert sorted(p.name for p in whole.glob("stage*.pt")) == ["stage0.step2.pt", "stage0.step4.pt",
                                                                "stage1.step2.pt", "stage1.step4.pt"]
    # the whole model's weights, gathered from the stages under its own names: they load into the model itself
    model = build_pipeline_model(from_dict(PipelineRunConfig, load_toml(whole / "config.toml")).model)
    model.load_state_dict(load_file(str(whole / "model.safetensors")))  # strict: every name, every shape
    stages = [load_checkpoint(whole / f"stage{s}.step4.pt")["model"] for s in (0, 1)]
    assert sum(len(s) for s in stages) == len(model.state_dict())
    values = sorted((v for s in stages for v in s.values()), key=lambda t: (t.shape, t.sum().item()))
    mine = sorted(model.state_dict().values(), key=lambda t: (t.shape, t.sum().item()))
    assert all(torch.equal(a, b) for a, b in zip(values, mine))

    # the same run cut after 2 steps, then resumed to 4, ends with the same weights and the same metrics
    config.write_text(CONFIG.format(name="cut", root=tmp_path / "runs"))
    pipeline.main(config, nproc=2, resume=False, overrides=["train.steps=2"], allreduce=None)
    pipeline.main(config, nproc=2, resume=True, overrides=[], allreduce=None)
    cut = tmp_path / "runs" / "cut"
    for stage in (0, 1):
        a = load_checkpoint(whole / f"stage{stage}.step4.pt")["model"]
        b = load_checkpoint(cut / f"stage{stage}.step4.pt")["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    resumed = _metrics(cut / "metrics.jsonl")
    assert [r["train_loss"] for r in resumed if "train_loss" in r] == [r["train_loss"] for r in records
                                                                        if "train_loss" in r]
    elapsed = [r["elapsed_s"] for r in resumed]
    assert elapsed == sorted(elapsed)  # the resumed clock goes on from step 2's


def test_cli_rejects_a_world_size_that_does_not_fit(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.format(name="bad", root=tmp_path / "runs"))
    result = run_plait("train", str(config), "--nproc", "3", "--set", "parallel.replicas=2")
    assert result.exit_code == 2
    assert "parallel.replicas × parallel.stages = 2 × 2 = 4 ranks, but 3 were started" in result.output
    assert not (tmp_path / "runs" / "bad").exists()  # nothing was created for a run that cannot start


def test_eval_every_zero_evaluates_once_at_the_end(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.format(name="end", root=tmp_path / "runs"))
    result = run_plait("train", str(config), "--nproc", "2", "--set", "train.eval_every=0",
                       "--set", "train.steps=3")
    assert result.exit_code == 0, result.output
    tests = [r for r in _metrics(tmp_path / "runs" / "end" / "metrics.jsonl") if "test_accuracy" in r]
    assert [r["step"] for r in tests] == [3]
