"""Issue 14 in the pipeline plane: `train.lr = 1e30` makes step 1's update huge (still finite) and step 2's loss
non-finite on the last stage; every stage stops at step 2 with exit code 1 and a message naming the step, the rank
and stage, and the last good checkpoint (step 1's, left as it was). Resumed from it with
`train.on_divergence = "skip"`, every later update is skipped and the run ends on step 1's weights."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics
from tests_support import run_plait

CONFIG = """
[run]
name = "pipe"
root = "{root}"
seed = 3
tensorboard = false
[model]
name = "mlp"
depth = 3
hidden = 32
[data]
batch_size = 16
[train]
steps = 4
lr = 1e30
log_every = 1
eval_every = 0
eval_examples = 100
checkpoint_every = 1
[parallel]
mode = "pipeline"
stages = 2
micro_batches = 2
schedule = "1f1b"
"""


@pytest.mark.timeout(240)  # two runs of `plait train`, each spawning 2 ranks
def test_a_diverging_pipeline_stops_where_the_loss_arises_and_resumes_from_the_last_good_checkpoint(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.format(root=tmp_path.as_posix()))
    result = run_plait("train", str(config), "--nproc", "2")
    run_dir = tmp_path / "pipe"
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())  # the console may wrap it
    assert "step 2: the loss is not finite on rank 1 (stage 1)" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoint.pt'} (step 1)" in message
    assert int(load_checkpoint(run_dir / "checkpoint.pt")["step"]) == 1
    assert sorted(p.name for p in run_dir.glob("stage*.pt")) == ["stage0.step1.pt", "stage1.step1.pt"]
    step_1 = {stage: load_checkpoint(run_dir / f"stage{stage}.step1.pt")["model"] for stage in (0, 1)}
    assert all(bool(torch.isfinite(w).all()) for weights in step_1.values() for w in weights.values())
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1] and "step 2" in records[-1]["diverged"]

    result = run_plait("train", str(config), "--nproc", "2", "--resume",
                                      "--set", 'train.on_divergence="skip"')
    assert result.exit_code == 0, result.output
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3, 4]
    assert [r["step"] for r in records if "train_loss" in r] == [1]
    for stage in (0, 1):  # no update applied after the last good checkpoint
        last = load_checkpoint(run_dir / f"stage{stage}.step4.pt")["model"]
        for key, weight in step_1[stage].items():
            torch.testing.assert_close(last[key], weight, atol=0, rtol=0)
