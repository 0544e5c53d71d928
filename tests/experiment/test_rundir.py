"""A run directory refuses to be started twice, and says how to go on when its run stopped before a checkpoint."""

import json

import pytest

from plait.experiment.rundir import prepare_run_dir


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_it_again(tmp_path):
    run = prepare_run_dir(tmp_path, "r", resume=False)
    run.metrics_path.write_text(json.dumps({"step": 1, "train_loss": 2.0}) + "\n")
    for resume, error in ((False, FileExistsError), (True, FileNotFoundError)):
        with pytest.raises(error, match=f"stopped before its first checkpoint: delete {run.path} to start it again"):
            prepare_run_dir(tmp_path, "r", resume=resume)
    run.checkpoint_path.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already holds a run; use --resume or another run.name"):
        prepare_run_dir(tmp_path, "r", resume=False)
    assert prepare_run_dir(tmp_path, "r", resume=True).path == run.path


def test_a_run_killed_before_any_record_starts_again(tmp_path):
    run = prepare_run_dir(tmp_path, "r", resume=False)
    run.metrics_path.write_text("")
    assert prepare_run_dir(tmp_path, "r", resume=False).path == run.path
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint at .*checkpoint.pt$"):
        prepare_run_dir(tmp_path, "r", resume=True)

