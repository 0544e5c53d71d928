"""The data-parallel trainer end to end on MNIST: metrics, stragglers, checkpoints, --resume, and a rank killed
under torchrun that restarts the group from the last checkpoint.

An uninterrupted run is the reference: a run stopped and resumed, and a run whose rank was killed, must end with
bit-identical parameters (no step lost or repeated) and a metrics log with every step exactly once.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import pytest
import torch

from plait.experiment.runs.data_parallel import main
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics
from tests_support import torchrun_and_kill_rank

STEPS = 60
CONFIG = """
[run]
name = "dp"
root = "{root}"
[parallel]
allreduce = "ring"
bucket_mb = 0.25
[train]
steps = {steps}
batch_size = 16
lr = 0.05
momentum = 0.9
log_every = 1
checkpoint_every = 10
eval_at_end = false
[stragglers]
ranks = [1]
factor = 4.0
"""


def _config(tmp: Path, name: str, steps: int = STEPS) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(root=(tmp / name).as_posix(), steps=steps))
    return path


def _final_params(tmp: Path, name: str) -> torch.Tensor:
    ckpt = load_checkpoint(tmp / name / "dp" / "checkpoint.pt")
    assert ckpt["step"] == STEPS
    return ckpt["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("dp")
    main(_config(tmp, "straight"), nproc=2, resume=False, overrides=[], allreduce=None)
    return tmp, _final_params(tmp, "straight")


def test_metrics_record_every_step_with_ring_bytes_and_a_slow_rank(reference):
    tmp, params = reference
    records = read_metrics(tmp / "straight" / "dp" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    run_dir = tmp / "straight" / "dp"  # every plane writes through the same sinks and draws its plots
    assert list((run_dir / "tb").glob("events.out.tfevents.*")) and (run_dir / "metrics.csv").exists()
    assert (run_dir / "plots" / "loss.png").exists()
    numel = params.numel()
    for r in records:  # ring on 2 ranks: each rank sends and receives S = 4·numel bytes per step
        assert r["bytes_up_per_rank"] == [4 * numel, 4 * numel] and r["bytes_down_per_rank"] == [4 * numel, 4 * numel]
        assert r["bytes_up"] == r["bytes_down"] == 8 * numel  # the canonical names: summed over the ranks
        assert r["samples_per_s"] > 0 and r["train_loss"] > 0 and r["lr"] == 0.05
        assert abs(r["time"] - time.time()) < 3600  # Unix time
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    fast = statistics.median(r["compute_s"][0] for r in records[5:])
    slow = statistics.median(r["compute_s"][1] for r in records[5:])
    assert slow > 2.0 * fast, (fast, slow)  # rank 1 sleeps 3× its compute time every step
    # the fast rank waits for the slow one at the barrier of every step
    fast_wait = statistics.median(r["comm_s"][0] for r in records[5:])
    slow_wait = statistics.median(r["comm_s"][1] for r in records[5:])
    assert fast_wait > slow_wait


def test_stop_and_resume_reaches_the_same_parameters(reference):
    tmp, params = reference
    main(_config(tmp, "resumed", steps=40), nproc=2, resume=False, overrides=[], allreduce=None)
    with pytest.raises(SystemExit):  # the run directory holds a run: refused before any rank starts
        main(_config(tmp, "resumed"), nproc=2, resume=False, overrides=[], allreduce=None)
    main(_config(tmp, "resumed"), nproc=2, resume=True, overrides=[], allreduce=None)
    records = read_metrics(tmp / "resumed" / "dp" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)  # the resumed clock goes on from step 40's
    assert torch.equal(_final_params(tmp, "resumed"), params)


def test_resume_refuses_another_model_and_a_finished_run_reports_its_figures(reference, capsys):
    tmp, _ = reference
    shutil.copytree(tmp / "straight", tmp / "again")  # the reference's own directory stays as the others read it
    config = _config(tmp, "again")
    settings = (tmp / "again" / "dp" / "config.toml").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(config, nproc=2, resume=True, overrides=["model.name='cnn'"], allreduce=None)
    said = capsys.readouterr()
    assert exit_.value.code == 2 and "the model changed (model.name, model.factory or model.options)" in said.err
    assert "Traceback" not in said.err + said.out
    assert (tmp / "again" / "dp" / "config.toml").read_text() == settings  # the refused resume's are not written
    main(config, nproc=2, resume=True, overrides=[], allreduce=None)
    said = capsys.readouterr().out
    last = read_metrics(tmp / "again" / "dp" / "metrics.jsonl")[-1]
    assert f"the run had done its {STEPS} steps already" in said
    assert f"final loss: {last['train_loss']:.4f}" in said  # the logged figure, not the NaN of no step


def test_the_documented_recipe_takes_the_weights_out_and_export_points_to_it(reference):
    from safetensors.torch import load_file

    from plait.parallel.components import build_image_model
    from plait.parallel.config import DataParallelRunConfig
    from plait.parallel.train import evaluate, load_data
    from plait.settings.config import from_dict, load_toml
    from tests_support import run_plait

    tmp, params = reference
    run_dir = tmp / "straight" / "dp"
    config = from_dict(DataParallelRunConfig, load_toml(run_dir / "config.toml"))
    model, data = build_image_model(config.model), load_data(config)
    before = evaluate(model, data, torch.device("cpu"), "classification")["test_accuracy"]
    torch.nn.utils.vector_to_parameters(torch.load(run_dir / "checkpoint.pt")["params"], model.parameters())
    after = evaluate(model, data, torch.device("cpu"), "classification")["test_accuracy"]
    assert before < 0.3 < 0.7 < after, (before, after)  # the trained model, not a fresh one
    again = build_image_model(config.model)
    again.load_state_dict(load_file(str(run_dir / "model.safetensors")))  # the run's own file: the same weights
    assert torch.equal(torch.nn.utils.parameters_to_vector(again.parameters()), params)
    result = run_plait("export", str(run_dir))
    assert result.exit_code == 2 and "writes its model.safetensors" in result.output


def test_a_setting_a_rank_finds_wrong_is_one_line_and_leaves_no_run(tmp_path, capsys):
    config = _config(tmp_path, "big", steps=2)
    with pytest.raises(SystemExit) as exit_:
        main(config, nproc=2, resume=False, overrides=["train.batch_size=40000"], allreduce=None)
    said = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in said.err
    assert "train.batch_size × train.accumulate × ranks = 80000 exceeds the 60000 training examples" in said.err
    main(config, nproc=2, resume=False, overrides=["stragglers.ranks=[]"], allreduce=None)  # not "holds a run"
    assert [r["step"] for r in read_metrics(tmp_path / "big" / "dp" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow  # a kill-and-restart variant: in make test-slow, to keep make test near 10 minutes
def test_killed_rank_under_torchrun_restarts_from_checkpoint(reference):
    tmp, params = reference
    run_dir = tmp / "killed" / "dp"
    killed_at, code, output = torchrun_and_kill_rank(["plait.cli", "train", str(_config(tmp, "killed"))], tmp,
                                                     run_dir, 15)
    assert killed_at is not None and killed_at < STEPS, f"the run ended before the kill:\n{output[-3000:]}"
    assert code == 0, output[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step lost, none repeated
    restarted = [r["step"] for r in records if r["restart"] == 1]
    assert restarted and restarted[0] % 10 == 1 and restarted[0] <= killed_at + 1
    assert torch.equal(_final_params(tmp, "killed"), params)


# The same run without stragglers, its gradients top-k compressed with error feedback.
COMPRESSED = CONFIG[:CONFIG.index("[stragglers]")] + """[compression]
codec = "topk"
ratio = 0.05
error_feedback = true
"""


@pytest.mark.slow  # a resume variant: in make test-slow, to keep make test near 10 minutes
def test_resume_with_topk_error_feedback_restores_each_ranks_residuals(tmp_path):
    """Each rank's error-feedback residual (what top-k has not sent yet) is state: gathered into the checkpoint,
    scattered back on resume, so the resumed run ends bit-identical to the uninterrupted one."""
    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}-{steps}.toml"
        path.write_text(COMPRESSED.format(root=(tmp_path / name).as_posix(), steps=steps))
        return path

    main(config("straight", 30), nproc=2, resume=False, overrides=[], allreduce=None)
    main(config("resumed", 20), nproc=2, resume=False, overrides=[], allreduce=None)
    stopped = load_checkpoint(tmp_path / "resumed" / "dp" / "checkpoint.pt")
    residuals = stopped["residuals"]
    assert stopped["step"] == 20 and residuals.shape == (2, stopped["params"].numel())
    assert residuals.abs().sum(1).min() > 0 and not torch.equal(residuals[0], residuals[1])  # per rank, non-zero
    main(config("resumed", 30), nproc=2, resume=True, overrides=[], allreduce=None)
    straight = load_checkpoint(tmp_path / "straight" / "dp" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "dp" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 30
    assert torch.equal(resumed["params"], straight["params"])
    assert torch.equal(resumed["residuals"], straight["residuals"])


def test_resume_with_adam_restores_both_moments_and_the_step_count(tmp_path):
    plain = CONFIG[:CONFIG.index("[stragglers]")]
    adam = ["train.optimizer=\"adam\"", "train.lr=0.002", "train.weight_decay=0.001"]

    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}-{steps}.toml"
        path.write_text(plain.format(root=(tmp_path / name).as_posix(), steps=steps))
        return path

    main(config("straight", 30), nproc=2, resume=False, overrides=adam, allreduce=None)
    main(config("resumed", 20), nproc=2, resume=False, overrides=adam, allreduce=None)
    stopped = load_checkpoint(tmp_path / "resumed" / "dp" / "checkpoint.pt")
    assert set(stopped["optim"]) == {"step", "exp_avg", "exp_avg_sq"} and float(stopped["optim"]["step"]) == 20
    main(config("resumed", 30), nproc=2, resume=True, overrides=adam, allreduce=None)
    straight = load_checkpoint(tmp_path / "straight" / "dp" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "dp" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 30
    assert torch.equal(resumed["params"], straight["params"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed["optim"][key], straight["optim"][key])


@pytest.mark.slow  # a resume variant: in make test-slow, to keep make test near 10 minutes
def test_a_checkpoint_from_before_adam_still_resumes_sgd_momentum(reference):
    """Checkpoints written before the optimizer choice held SGD's momentum as `momentum`: they still resume."""
    from plait.runtime.checkpoint import save_checkpoint

    tmp, params = reference
    main(_config(tmp, "legacy", steps=40), nproc=2, resume=False, overrides=[], allreduce=None)
    path = tmp / "legacy" / "dp" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["momentum"] = ckpt.pop("optim")["momentum_buffer"]
    save_checkpoint(path, ckpt)
    main(_config(tmp, "legacy"), nproc=2, resume=True, overrides=[], allreduce=None)
    assert torch.equal(_final_params(tmp, "legacy"), params)


@pytest.mark.slow  # a resume variant: in make test-slow, to keep make test near 10 minutes
def test_resuming_with_another_optimizer_starts_its_state_fresh(tmp_path, capfd):
    plain = CONFIG[:CONFIG.index("[stragglers]")]
    path = tmp_path / "switch.toml"
    path.write_text(plain.format(root=tmp_path.as_posix(), steps=20))
    main(path, nproc=2, resume=False, overrides=["train.steps=10"], allreduce=None)  # SGD with momentum
    assert load_checkpoint(tmp_path / "dp" / "checkpoint.pt")["optimizer"] == "sgd"
    main(path, nproc=2, resume=True, overrides=["train.optimizer=\"adam\"", "train.lr=0.001"], allreduce=None)
    assert "the checkpoint's optimizer state is sgd's, this run uses train.optimizer = 'adam'" in capfd.readouterr().out
    resumed = load_checkpoint(tmp_path / "dp" / "checkpoint.pt")
    assert resumed["step"] == 20 and resumed["optimizer"] == "adam"
    assert float(resumed["optim"]["step"]) == 10  # Adam's own count: its state began at the resume
