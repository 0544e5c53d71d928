"""A pipeline rank killed under `torchrun --max-restarts 1`: the restarted group resumes from the last checkpoint by
itself (no FileExistsError, no --resume) and ends bit-identical to an uninterrupted run, every step logged once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.experiment.run import Run
from plait.experiment.rundir import RunDir
from plait.experiment.runs import pipeline
from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline.checkpoints import agreed_step, fetch_missing_stage_files, stage_file
from plait.runtime.checkpoint import load_checkpoint, save_checkpoint
from plait.runtime.metrics_log import read_metrics
from tests_support import PIPELINE_KILL_CONFIG as CONFIG
from tests_support import torchrun_and_kill_rank

STEPS = 300


def _config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, root=(tmp / "runs").as_posix(), steps=STEPS))
    return path


@pytest.mark.slow  # a kill-and-restart variant: in make test-slow, to keep make test near 10 minutes
def test_a_pipeline_rank_killed_under_torchrun_resumes_from_its_checkpoint(tmp_path):
    pipeline.main(_config(tmp_path, "straight"), nproc=2, resume=False, overrides=[], allreduce=None)
    run_dir = tmp_path / "runs" / "killed"
    killed_at, code, output = torchrun_and_kill_rank(
        ["plait.cli", "train", str(_config(tmp_path, "killed"))], tmp_path, run_dir, 50,
        wait_s=120, finish_s=180)  # the last stage is killed
    assert killed_at is not None and killed_at < STEPS, f"the run ended before the kill:\n{output[-3000:]}"
    assert code == 0, output[-3000:]
    assert "already holds a run" not in output
    records = read_metrics(run_dir / "metrics.jsonl")
    trained = [r["step"] for r in records if "train_loss" in r]
    assert trained == list(range(1, STEPS + 1))  # no step lost, none logged twice
    assert [r["step"] for r in records if "test_accuracy" in r] == [STEPS]  # eval_every = 0: once, at the end
    assert int(load_checkpoint(run_dir / "checkpoint.pt")["step"]) == STEPS
    straight = tmp_path / "runs" / "straight"
    for stage in (0, 1):  # the resumed group redid the steps after its checkpoint exactly
        a = load_checkpoint(straight / f"stage{stage}.step{STEPS}.pt")["model"]
        b = load_checkpoint(run_dir / f"stage{stage}.step{STEPS}.pt")["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def _moved_ranks(rank: int, world_size: int, root: str) -> tuple[int, list[int], bytes]:
    """Rank r runs stage r in its own directory node<r>, which holds the other stage's files (torchrun put the
    ranks on each other's node); node1 has no checkpoint.pt at all, and node0's says step 4."""
    run = Run(RunDir(Path(root) / f"node{rank}"), resume=True, step_key="step", total=4, description="steps",
              writes=False)
    step = agreed_step(run, boundaries=[2], num_stages=2)
    received = fetch_missing_stage_files(run.path, stage_index=rank, step=step, num_stages=2)
    return step, received, stage_file(run.path, rank, step).read_bytes()


def test_a_rank_on_another_node_receives_its_stage_files_from_the_rank_that_holds_them(tmp_path):
    for node, other_stage in ((0, 1), (1, 0)):
        (tmp_path / f"node{node}").mkdir()
        stage_file(tmp_path / f"node{node}", other_stage, 4).write_bytes(f"stage {other_stage}".encode())
    save_checkpoint(tmp_path / "node0" / "checkpoint.pt",
                    {"step": 4, "stages": 2, "boundaries": torch.tensor([2], dtype=torch.int64)})
    results = spawn_ranks(_moved_ranks, 2, str(tmp_path), timeout_s=120)
    assert results == [(4, [0, 1], b"stage 0"), (4, [0, 1], b"stage 1")]


def _prepare_resume(rank: int, world_size: int, raw: dict) -> int:
    from plait.parallel.pipeline.config import PipelineRunConfig
    from plait.settings.config import from_dict

    return pipeline.prepare_under_torchrun(from_dict(PipelineRunConfig, raw), resume=True)[0].path.exists()


def test_a_resume_under_torchrun_refuses_another_model_and_says_what_else_changed(tmp_path):
    # the ranks prepare the run directory themselves under torchrun: the same refusal as a spawned run's
    import tomllib

    from plait.parallel.launch import RankFailed
    from plait.parallel.pipeline.config import PipelineRunConfig
    from plait.settings.config import from_dict, to_dict

    raw = tomllib.loads(CONFIG.format(name="held", root=(tmp_path / "runs").as_posix(), steps=40))
    run = RunDir(tmp_path / "runs" / "held")
    run.write_config(from_dict(PipelineRunConfig, raw))
    save_checkpoint(run.checkpoint_path, {"step": 20})
    deeper = {**raw, "model": {**raw["model"], "depth": 6}}
    with pytest.raises(RankFailed, match=r"--resume with another experiment \(model.depth: 4 then, 6 now\)") as err:
        spawn_ranks(_prepare_resume, 2, to_dict(from_dict(PipelineRunConfig, deeper)), timeout_s=120)
    assert err.value.setting  # a usage error: the command says it in one line, exit 2
    assert tomllib.loads(run.config_path.read_text())["model"]["depth"] == 4  # the run's own, kept
    longer = {**raw, "train": {**raw["train"], "steps": 60}}
    assert spawn_ranks(_prepare_resume, 2, to_dict(from_dict(PipelineRunConfig, longer)), timeout_s=120) == [1, 1]
    assert tomllib.loads(run.config_path.read_text())["train"]["steps"] == 60  # the settings it goes on with
