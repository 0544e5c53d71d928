"""The `plait` command end to end: bad configs fail at start naming the key; a run killed with SIGKILL resumes
with `--resume` and ends exactly as the uninterrupted run, no round lost or repeated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.settings.config import from_dict, load_toml
from tests_support import run_plait

CONFIG = """
[run]
name = "{name}"
root = "{root}"
seed = 1
threads = 1
[data]
num_clients = 10
partition = "dirichlet"
alpha = 0.5
[fl]
rounds = {rounds}
fraction = 0.3
min_clients = 2
eval_every = 0
[fl.plan]
batch_size = 10
max_steps = 40
"""


def _write(tmp_path, name="r", rounds=12, extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, root=tmp_path / "runs", rounds=rounds) + extra)
    return path


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_killed_run_resumes_without_losing_or_repeating_a_round(tmp_path):
    # Prepare: the reference, uninterrupted, in-process
    config_path = _write(tmp_path)
    reference = run_federated(from_dict(FederatedRunConfig, load_toml(_write(tmp_path, "ref"))), show_progress=False)
    ref_params = torch.load(reference.run_dir / "checkpoint.pt", weights_only=True)["params"]
    run_dir = tmp_path / "runs" / "r"
    plait = [sys.executable, "-m", "plait.cli"]
    # Execute: start the run, SIGKILL it once 3 rounds are logged, then resume
    proc = subprocess.Popen([*plait, "run", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(_rounds(run_dir)) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    done_before = len(_rounds(run_dir))
    assert proc.returncode == -signal.SIGKILL and 3 <= done_before < 12, "the run must be killed mid-way"
    resumed = subprocess.run([*plait, "run", str(config_path), "--resume"], capture_output=True, text=True, timeout=120)
    # Assert
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert _rounds(run_dir) == list(range(1, 13))
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["params"]
    assert torch.allclose(params, ref_params, atol=1e-6)


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tmp_path):
    config_path, run_dir = _write(tmp_path, rounds=200), tmp_path / "runs" / "r"
    proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "run", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").exists() and _rounds(run_dir)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == ("error: interrupted (the same command with --resume goes on from the last checkpoint, "
                           "when one was written)")
    assert 1 <= len(_rounds(run_dir)) < 200


def test_unknown_config_key_fails_at_start_naming_it(tmp_path):
    path = _write(tmp_path, extra="lrr = 0.1\n")  # lands in [fl.plan]
    result = run_plait("run", str(path))
    assert result.exit_code == 2 and "fl.plan.lrr" in result.output and "did you mean 'fl.plan.lr'?" in result.output
    assert not (tmp_path / "runs" / "r" / "metrics.jsonl").exists()


def test_a_check_that_names_its_key_is_not_prefixed_again(tmp_path):
    result = run_plait("run", str(_write(tmp_path)), "--set", 'fl.task="regresion"')
    assert result.exit_code == 2 and "error: fl.task = 'regresion'" in result.output and "fl: fl." not in result.output


def test_wrong_type_and_bad_value_are_named(tmp_path):
    result = run_plait("run", str(_write(tmp_path)), "--set", "fl.rounds='ten'")
    assert result.exit_code == 2 and "fl.rounds" in result.output
    result = run_plait("run", str(_write(tmp_path)), "--set", "data.partition=stripes")
    assert result.exit_code == 2 and "data.partition" in result.output


def test_bad_data_path_fails_at_start(tmp_path):
    result = run_plait("run", str(_write(tmp_path)), "--set", f"data.path='{tmp_path}/none'")
    assert result.exit_code == 2 and "data.path" in result.output


def test_existing_run_needs_resume_and_resume_needs_checkpoint(tmp_path):
    path = _write(tmp_path, rounds=1)
    assert run_plait("run", str(path), "--resume").exit_code == 2
    first = run_plait("run", str(path))
    assert first.exit_code == 0, first.output
    again = run_plait("run", str(path))
    assert again.exit_code == 2 and "--resume" in again.output


def test_plot_command_writes_pngs(tmp_path):
    path = _write(tmp_path, rounds=2)
    assert run_plait("run", str(path)).exit_code == 0
    result = run_plait("plot", str(tmp_path / "runs" / "r"))
    assert result.exit_code == 0
    pngs = sorted((tmp_path / "runs" / "r" / "plots").glob("*.png"))
    assert any(p.name == "loss.png" for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_run_logged_under_the_older_metric_names_resumes_and_plots(tmp_path):
    # Prepare: two rounds, then the log rewritten as runs wrote it before the canonical names (no lr, no time)
    path = _write(tmp_path, rounds=2)
    assert run_plait("run", str(path)).exit_code == 0
    log = tmp_path / "runs" / "r" / "metrics.jsonl"
    fresh = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"lr", "time", "elapsed_s"} <= r.keys() for r in fresh) and "test_accuracy" in fresh[-1]
    older = {"test_accuracy": "accuracy", "test_loss": "loss"}
    log.write_text("".join(json.dumps({older.get(k, k): v for k, v in r.items() if k not in ("lr", "time")}) + "\n"
                           for r in fresh))
    # Execute
    result = run_plait("run", str(path), "--resume", "--set", "fl.rounds=3")
    # Assert: the old rounds kept as written, the new one under the canonical names, the clock going on
    assert result.exit_code == 0 and "final test accuracy" in result.output, result.output
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3] and "accuracy" in records[1]
    assert {"test_accuracy", "test_loss", "lr", "time"} <= records[2].keys()
    assert records[2]["elapsed_s"] > records[1]["elapsed_s"]
    assert (tmp_path / "runs" / "r" / "plots" / "accuracy.png").exists()


def test_spent_privacy_budget_ends_the_run_early(tmp_path):
    # Prepare: central DP with a budget that allows only a few of the 30 rounds (a clip norm small enough that the
    # noise does not wreck the model: with 0.5 the clients diverged from round 2, unnoticed before divergence checks)
    extra = ("[fl.strategy]\nweighting = \"uniform\"\n"
             "[fl.privacy]\nmode = \"central\"\nclip_norm = 0.05\nnoise_multiplier = 2.0\nepsilon_budget = 2.0\n")
    config = from_dict(FederatedRunConfig, load_toml(_write(tmp_path, "dp", rounds=30, extra=extra)))
    # Execute
    summary = run_federated(config, show_progress=False)
    # Assert: the log stops at the round that found the budget spent, ε never over budget, accuracy reported
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 < len(records) < 30 and records[-1]["stop"] is True
    assert all(r["epsilon"] <= 2.0 for r in records) and "test_accuracy" in records[-1]
    assert records[-1]["skipped"] and records[-1]["lr"] == 0.1  # a round that trained nobody still says its lr


@pytest.mark.parametrize("executor", ["process_pool", "threads"])
def test_parallel_executor_from_config_matches_sequential(tmp_path, executor):
    base = load_toml(_write(tmp_path, "seq", rounds=2))
    sequential = run_federated(from_dict(FederatedRunConfig, base), show_progress=False)
    pooled_cfg = load_toml(_write(tmp_path, "pool", rounds=2))
    pooled_cfg["fl"].update(executor=executor, workers=2)
    pooled = run_federated(from_dict(FederatedRunConfig, pooled_cfg), show_progress=False)
    a = torch.load(sequential.run_dir / "checkpoint.pt", weights_only=True)["params"]
    b = torch.load(pooled.run_dir / "checkpoint.pt", weights_only=True)["params"]
    assert torch.equal(a, b)  # same clients, same plans, same order of summation: the same bits


def test_resume_with_error_feedback_is_exact(tmp_path):
    # Prepare: top-k with error feedback keeps a residual per client between rounds
    extra = '[fl.compression]\ncodec = "topk"\nratio = 0.2\nerror_feedback = true\n'
    straight = run_federated(from_dict(FederatedRunConfig, load_toml(_write(tmp_path, "ef", rounds=3, extra=extra))),
                             show_progress=False)
    # Execute: the same run stopped after round 1, then resumed in a fresh process state
    first = from_dict(FederatedRunConfig, load_toml(_write(tmp_path, "ef2", rounds=3, extra=extra)))
    first.fl.rounds = 1
    stopped = run_federated(first, show_progress=False)
    log = stopped.run_dir / "metrics.jsonl"  # say round 1 took 1000 s, to see the resumed clock go on from there
    log.write_text(json.dumps({**json.loads(log.read_text().splitlines()[0]), "elapsed_s": 1000.0}) + "\n")
    resumed = run_federated(from_dict(FederatedRunConfig, load_toml(_write(tmp_path, "ef2", rounds=3, extra=extra))),
                            resume=True, show_progress=False)
    # Assert
    a = torch.load(straight.run_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["params"], b["params"]) and a["residuals"].keys() == b["residuals"].keys()
    assert len(a["residuals"]) > 0
    # the resumed log's clock goes on from round 1's, so elapsed_s stays the run's training time
    elapsed = [json.loads(line)["elapsed_s"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert elapsed[0] == 1000.0 and 1000.0 < elapsed[1] < elapsed[2] < 1000.0 + 120
    # the run directory's config is the one the run went on with (1 round when it stopped, 3 in all)
    assert load_toml(resumed.run_dir / "config.toml")["fl"]["rounds"] == 3


def test_resuming_a_finished_run_reports_its_last_round(tmp_path):
    path = _write(tmp_path, "done", rounds=2, extra="")
    done = run_federated(from_dict(FederatedRunConfig, load_toml(path)), show_progress=False)
    again = run_federated(from_dict(FederatedRunConfig, load_toml(path)), resume=True, show_progress=False)
    assert done.final["round"] == 2 and again.rounds == 2
    assert {k: v for k, v in again.final.items() if k != "time"} == {k: v for k, v in done.final.items() if k != "time"}
    assert _rounds(again.run_dir) == [1, 2]  # nothing ran again


def test_train_dispatch_follows_set_overrides(tmp_path):
    config = tmp_path / "dp.toml"
    config.write_text("[parallel]\nmode = 'data'\n")
    result = run_plait("train", str(config), "--set", "parallel=3")
    assert result.exit_code == 2 and "'parallel' must be a table" in result.output


def test_an_override_under_a_string_that_is_no_tables_shorthand_says_how_to_set_it(tmp_path):
    from plait.settings.config import ConfigError, apply_overrides

    said = r"fl.task is 'classify' here, not a table: override it whole \(--set fl.task=\.\.\.\)"
    with pytest.raises(ConfigError, match=said):
        apply_overrides({"fl": {"task": "classify"}}, ["fl.task.kind=x"], FederatedRunConfig)
    with pytest.raises(ConfigError, match="model is 'pkg:make' here, not a table"):  # no config class: no shorthand
        apply_overrides({"model": "pkg:make"}, ["model.factory=other:make"])
    assert apply_overrides({"model": "pkg:make"}, ["model='other:make'"]) == {"model": "other:make"}
    assert apply_overrides({}, ["fl.plan.lr=0.2"]) == {"fl": {"plan": {"lr": 0.2}}}


def test_an_override_under_a_shorthand_opens_it_into_its_table():
    from plait.settings.config import apply_overrides

    opened = apply_overrides({"model": "pkg:make", "data": "pkg:load"},
                             ["model.options.width=64", "data.num_clients=7"], FederatedRunConfig)
    assert opened == {"model": {"factory": "pkg:make", "options": {"width": 64}},
                      "data": {"source": "pkg:load", "num_clients": 7}}
    assert apply_overrides({"model": "pkg:make"}, ["model.factory=other:make"], FederatedRunConfig) == {
        "model": {"factory": "other:make"}}


NET = """
import torch.nn as nn


def make(hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
"""


def test_the_cli_sets_an_option_of_a_model_named_by_its_shorthand(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    path = _write(tmp_path, "short", rounds=1)
    path.write_text('model = "net.py:make"\n' + path.read_text())
    result = run_plait("run", str(path), "--set", "model.options.hidden=5", "--set", "fl.plan.max_steps=2")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "short"
    written = load_toml(run_dir / "config.toml")["model"]
    assert (written["factory"], written["options"]) == (f"{tmp_path / 'net.py'}:make", {"hidden": 5})
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["params"]
    assert params.numel() == 784 * 5 + 5 + 5 * 10 + 10  # the model the option made, not make()'s default 8


def test_a_shorthand_beside_its_table_says_where_it_goes(tmp_path):
    from plait.settings.config import ConfigError

    path = tmp_path / "c.toml"
    path.write_text('data = "x.npz"\n[data]\nbatch_size = 8\n')
    with pytest.raises(ConfigError, match=r'invalid TOML: .*goes inside its table .*\[data\] source = "\.\.\."'):
        load_toml(path)


def test_a_resume_refuses_another_experiment_and_says_what_else_changed(tmp_path, capsys):
    path = _write(tmp_path, "exp", rounds=2)
    run_federated(from_dict(FederatedRunConfig, load_toml(path)), show_progress=False)
    config = from_dict(FederatedRunConfig, load_toml(path))
    config.data.partition = "iid"
    with pytest.raises(ValueError, match=r"--resume with another experiment \(data.partition: 'dirichlet' then, "
                                         r"'iid' now\)"):
        run_federated(config, resume=True, show_progress=False)
    run_dir = tmp_path / "runs" / "exp"
    assert load_toml(run_dir / "config.toml")["data"]["partition"] == "dirichlet"  # the run's own, kept
    assert _rounds(run_dir) == [1, 2]
    # a run whose config.toml predates a setting (here data.test_path, an experiment key) ran as its default did
    saved = (run_dir / "config.toml").read_text()
    assert 'test_path = ""' in saved
    (run_dir / "config.toml").write_text(saved.replace('test_path = ""\n', ""))
    more = from_dict(FederatedRunConfig, load_toml(path))
    more.fl.rounds = 3
    capsys.readouterr()
    assert run_federated(more, resume=True, show_progress=False).rounds == 3
    assert "note: resumed with changed settings: fl.rounds 2 → 3" in capsys.readouterr().err
