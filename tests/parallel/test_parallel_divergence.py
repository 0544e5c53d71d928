"""Issue 14 in the data-parallel plane: a non-finite loss, gradient or update is found at the step where it arises,
every rank takes the same decision (no rank is left waiting in a collective), and the run stops with exit code 1 and
a message naming the step, the ranks and the last good checkpoint, which `--resume` then starts from; or, with
`train.on_divergence = "skip"`, that step's update is skipped and training goes on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divergence_support import RANK_VARIABLE, STEP_VARIABLE
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.divergence import DivergenceGuard
from plait.parallel.launch import spawn_ranks
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.divergence import Diverged
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import ConfigError, from_dict
from tests_support import run_plait

CONFIG = """
[run]
name = "dp"
root = "{root}"
tensorboard = false
[parallel]
allreduce = "ring"
[model]
name = "2nn"
[train]
steps = 6
batch_size = 16
log_every = 1
checkpoint_every = 2
eval_at_end = false
on_divergence = "{policy}"
[comm_hook]
name = "divergence_support:NaNGradientHook"
"""


def _config(tmp_path: Path, policy: str) -> Path:
    path = tmp_path / f"{policy}.toml"
    path.write_text(CONFIG.format(root=(tmp_path / policy).as_posix(), policy=policy))
    return path


def _finite(params: torch.Tensor) -> bool:
    return bool(torch.isfinite(params).all())


@pytest.mark.timeout(240)  # two runs of `plait train`, each spawning 2 ranks
def test_a_nan_at_step_3_stops_the_run_keeps_step_2s_checkpoint_and_resume_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv(STEP_VARIABLE, "3")
    monkeypatch.setenv(RANK_VARIABLE, "1")
    config = _config(tmp_path, "stop")
    result = run_plait("train", str(config), "--nproc", "2")
    run_dir = tmp_path / "stop" / "dp"
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())  # the console may wrap it
    assert "step 3: the gradient after the sync is not finite on rank 0, rank 1" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoint.pt'} (step 2)" in message
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["step"] == 2 and _finite(checkpoint["params"])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]
    assert records[-1]["step"] == 3 and "step 3" in records[-1]["diverged"]

    # the cause removed, --resume starts from the last good checkpoint and finishes the run
    result = run_plait("train", str(config), "--nproc", "2", "--resume",
                                      "--set", 'comm_hook.name="none"')
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["step"] == 6 and _finite(checkpoint["params"])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not any("diverged" in r for r in records)  # the stopped step's record went with the steps redone


@pytest.mark.timeout(180)
def test_on_divergence_skip_drops_that_steps_update_and_trains_on(tmp_path, monkeypatch):
    monkeypatch.setenv(STEP_VARIABLE, "3")
    monkeypatch.setenv(RANK_VARIABLE, "0")
    result = run_plait("train", str(_config(tmp_path, "skip")), "--nproc", "2")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "skip" / "dp"
    records = read_metrics(run_dir / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and "gradient after the sync" in skipped[0]["diverged"]
    # the skipped step's loss is left out of the record: its update was not applied
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 4, 5, 6]
    assert all(r["train_loss"] > 0 for r in records if "train_loss" in r)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["step"] == 6 and _finite(checkpoint["params"])


def _guard_rank(rank: int, world_size: int) -> dict:
    """Only rank 1 sees a NaN loss at step 2, only rank 0 infinite parameters after step 3's update; both ranks
    must take the same decisions, under either policy."""
    out: dict = {}
    good = torch.ones(4)
    for policy in ("stop", "skip"):
        guard = DivergenceGuard(policy, Path("runs/x/checkpoint.pt"), last_good=None, device=torch.device("cpu"))
        seen: dict = {"step_1": guard.before_update(1, loss=torch.tensor(0.5), grads=[good], params=[good])}
        guard.saved(1)
        loss = torch.tensor(float("nan") if rank == 1 else 0.5)
        try:
            seen["step_2"] = guard.before_update(2, loss=loss, grads=[good], params=[good])
        except Diverged as err:
            seen["step_2"] = str(err)
        try:  # an update that made the parameters infinite stops even under "skip": skipping cannot repair them
            guard.before_checkpoint(3, [torch.tensor([float("inf")]) if rank == 0 else good])
        except Diverged as err:
            seen["checkpoint_3"] = str(err)
        out[policy] = seen
    # plain data parallel: the synced gradient is the same everywhere, so the ranks decide without meeting; a loss
    # that only one rank sees decides nothing there (a collective entered by one rank alone would hang)
    guard = DivergenceGuard("stop", Path("runs/x/checkpoint.pt"), last_good=None, device=torch.device("cpu"))
    out["shared_rank_loss"] = guard.before_update(1, loss=torch.tensor(float("nan") if rank == 1 else 0.5),
                                                  grads=[good], params=[good], shared=True)
    try:
        guard.before_update(2, loss=torch.tensor(0.5), grads=[torch.tensor([1.0, float("inf")])], params=[good],
                            shared=True)
    except Diverged as err:
        out["shared_gradient"] = str(err)
    # local SGD: each rank notes what it sees, with no collective, until the ranks agree before averaging
    guard = DivergenceGuard("stop", Path("runs/x/checkpoint.pt"), last_good=None, device=torch.device("cpu"))
    for step in (4, 5):
        guard.note(step, loss=torch.tensor(float("nan") if rank == 1 else 0.5), grads=[good], params=[good])
    try:
        guard.agree(6, [good])
    except Diverged as err:
        out["local_sgd"] = str(err)
    return out


@pytest.fixture(scope="module")
def guard_ranks() -> list[dict]:
    return spawn_ranks(_guard_rank, 2, timeout_s=60)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_every_rank_takes_the_same_decision_and_the_message_names_the_rank(guard_ranks, policy):
    first, second = guard_ranks[0][policy], guard_ranks[1][policy]
    assert first == second  # the same answer on both ranks: none is left waiting in a collective
    assert first["step_1"] is True
    if policy == "skip":
        assert first["step_2"] is False
    else:
        assert first["step_2"] == ("step 2: the loss is not finite on rank 1 (train.on_divergence = 'stop': lower "
                                   "train.lr, or set it to 'skip'); the last good checkpoint is runs/x/checkpoint.pt "
                                   "(step 1); --resume starts from it")
    assert first["checkpoint_3"].startswith("step 3: its update made the parameters non-finite on rank 0 ")


def test_with_a_shared_gradient_the_ranks_meet_only_when_it_is_not_finite(guard_ranks):
    assert guard_ranks[0]["shared_rank_loss"] is guard_ranks[1]["shared_rank_loss"] is True
    assert guard_ranks[0]["shared_gradient"] == guard_ranks[1]["shared_gradient"]
    assert guard_ranks[0]["shared_gradient"].startswith(
        "step 2: the gradient after the sync is not finite on rank 0, rank 1 (train.on_divergence = 'stop'")


def test_local_sgd_ranks_agree_before_averaging_on_the_first_step_that_diverged(guard_ranks):
    assert guard_ranks[0]["local_sgd"] == guard_ranks[1]["local_sgd"] == (
        "step 4: the loss is not finite on rank 1 (train.on_divergence = 'stop': lower train.lr, or set it to 'skip'); "
        "no checkpoint was written before it: nothing to resume")


@pytest.mark.parametrize(("settings", "named"), [
    ({"train": {"on_divergence": "pause"}}, "train.on_divergence = 'pause' is unknown"),
    ({"train": {"on_divergence": "skip"}, "sync": {"kind": "local_sgd"}},
     "train.on_divergence = 'skip' does not go with sync.kind = 'local_sgd'"),
])
def test_a_wrong_on_divergence_names_the_setting(settings, named):
    with pytest.raises((ConfigError, ValueError), match=named):
        from_dict(DataParallelRunConfig, settings)
