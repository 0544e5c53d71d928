"""No silent divergence on the parameter-server plane: a worker whose loss or gradient turns non-finite stops the run
(exit 1, a message naming the step, the worker and the last good checkpoints), or skips the step with
train.on_divergence = "skip"; --resume goes on from the servers' checkpoints. Whole runs, as `plait train` runs
them (fault.nan_worker injects the divergence)."""

import numpy as np
import pytest
import torch
from test_ps_cluster import make_config

from plait.experiment.runs.parameter_server import main, run_ps
from plait.ps.checkpoint import load_shards
from plait.ps.divergence import WorkerDiverged
from plait.runtime.metrics_log import read_metrics

STEPS = 8


def write_config(path, root, name: str, **sections) -> None:
    tables = {"run": f'name = "{name}"\nroot = "{root}"', "data": "test_examples = 200",
              "train": f"steps = {STEPS}\nbatch_size = 16\neval_every_s = 0.2",
              # no worker dropped while it waits at the start barrier on a busy machine (a rejoin would move its
              # clock on): the clocks stay as pushed
              "sync": 'kind = "ps"\nconsistency = "bsp"\nservers = 2\nworker_timeout_s = 60', **sections}
    path.write_text("".join(f"[{table}]\n{body}\n" for table, body in tables.items()))


def test_a_diverged_worker_stops_the_run_with_exit_1_and_resume_goes_on_from_the_last_good_state(tmp_path, capsys):
    config_path = tmp_path / "cfg.toml"
    write_config(config_path, tmp_path, "nan", fault="nan_worker = 1\nnan_at_step = 3")
    with pytest.raises(SystemExit) as stopped:
        main(config_path, 2, False, [], None)
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "ps worker 1, step 3: train loss not finite" in message
    assert f"servers' checkpoints in {tmp_path / 'nan' / 'servers'}" in " ".join(message.split())
    run_dir = tmp_path / "nan"
    assert read_metrics(run_dir / "worker-1.jsonl")[-1]["event"] == "diverged"
    assert [r["worker"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "diverged"] == [1]
    for index in range(2):  # the NaN was never pushed: the final checkpoints are finite, at worker 1's clock 2
        snapshot = load_shards(run_dir / "servers" / f"server-{index}.npz")
        assert all(np.isfinite(shard.param).all() and shard.clocks[1] == 2 for shard in snapshot.shards.values())
    with pytest.raises(SystemExit):  # the same settings diverge again at the same step: still no silent run
        main(config_path, 2, True, [], None)
    summary = run_ps(make_config(tmp_path, "nan", sync={"servers": 2, "consistency": "bsp", "worker_timeout_s": 60},
                                 train={"steps": STEPS}, data={"test_examples": 200}),
                     num_workers=2, resume=True, timeout_s=240, show_progress=False)
    assert summary.final["step"] == STEPS and np.isfinite(summary.weights).all()
    records = read_metrics(run_dir / "worker-1.jsonl")
    steps = [r["step"] for r in records]
    assert steps == list(range(STEPS))  # the diverged step was redone, its record gone with the resume
    assert not [r for r in records if "event" in r]


def test_skip_leaves_the_diverged_step_out_and_the_run_finishes(tmp_path):
    config = make_config(tmp_path, "skip", sync={"servers": 1, "consistency": "bsp"},
                         train={"on_divergence": "skip"}, fault={"nan_worker": 0, "nan_at_step": 2})
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert summary.failed_workers == [] and summary.final["step"] == config.train.steps
    assert np.isfinite(summary.weights).all()
    records = read_metrics(tmp_path / "skip" / "worker-0.jsonl")
    assert [r["step"] for r in records] == list(range(config.train.steps))
    assert [r["step"] for r in records if "skipped" in r] == [2] and "not finite" in records[2]["skipped"]
    # Worker 1 was not held back at clock 2: the clock completed with its gradient alone.
    assert [r["step"] for r in read_metrics(tmp_path / "skip" / "worker-1.jsonl")] == list(range(config.train.steps))


def test_the_divergence_settings_are_checked():
    from plait.ps.config import PSRunConfig, TrainSection
    from plait.settings.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="train.on_divergence"):
        from_dict(PSRunConfig, {"train": {"on_divergence": "ignore"}})
    config = PSRunConfig(train=TrainSection(on_divergence="skip"))
    config.fault.nan_worker = 2
    with pytest.raises(ValueError, match="fault.nan_worker = 2 but there are only 2 workers"):
        config.check_workers(2)
    assert issubclass(WorkerDiverged, RuntimeError)


def test_a_finished_run_says_where_its_plots_are_and_leaves_its_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    from plait.core.flat import flat_params
    from plait.experiment.runs.parameter_server import load_run_config
    from plait.ps.checkpoint import load_shards
    from plait.ps.trainer import build_flat_model

    config_path = tmp_path / "cfg.toml"
    write_config(config_path, tmp_path, "ok")
    main(config_path, 2, False, [], None)
    said = " ".join(capsys.readouterr().out.split())
    assert f"plot: {tmp_path / 'ok' / 'plots' / 'loss.png'}" in said
    model, initial, _ = build_flat_model(load_run_config(config_path, []))
    model.load_state_dict(load_file(str(tmp_path / "ok" / "model.safetensors")))
    weights, _ = flat_params(model)
    # the servers' final pieces, laid end to end by key range, are the weights the file holds
    pieces = {}
    for index in range(2):
        pieces.update(load_shards(tmp_path / "ok" / "servers" / f"server-{index}.npz").shards)
    served = np.concatenate([pieces[key].param for key in sorted(pieces)])
    assert np.array_equal(weights.numpy(), served) and not torch.equal(weights, initial)
