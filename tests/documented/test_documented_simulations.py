"""The documented `plait run` commands (federated simulations) and `make demo`'s recipe, each run as written in a
copy of examples/, one round long: the test appends `--set fl.rounds=1` (and says where it adds more)."""

from __future__ import annotations

import json
import re

import pytest
from as_a_user import REPO, accuracy, printed_accuracy, records, run, user_folder
from docs_commands import documented

pytestmark = pytest.mark.slow
ONE_ROUND = ["--set", "fl.rounds=1"]  # added by the test: one round instead of the config's tens


def _run_directory(output: str, folder):
    found = re.findall(r"^run directory: (\S+)$", output, flags=re.MULTILINE)
    assert found, f"no run directory printed:\n{output[-3000:]}"
    return folder / found[-1]


@pytest.mark.parametrize("command", [
    documented("plait run examples/fedavg_mnist.toml"),
    documented("plait run examples/gossip.toml"),
    documented("plait run examples/fedavg_dp.toml"),
    documented("plait run examples/custom_model/fl.toml"),
])
def test_a_classification_example_runs_and_prints_its_accuracy(tmp_path, command):
    # Prepare
    folder = user_folder(tmp_path)
    # Execute
    output = run(command, folder, ONE_ROUND)
    # Assert
    run_dir = _run_directory(output, folder)
    last = records(run_dir)[-1]
    assert last["round"] == 1 and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)
    assert (run_dir / "model.safetensors").exists() and (run_dir / "plots" / "accuracy.png").exists()
    if command.endswith("fedavg_dp.toml"):  # the privacy spent, each round
        assert 0 < last["epsilon"] < 8.0


def test_the_regression_example_runs_and_logs_its_loss(tmp_path):
    folder = user_folder(tmp_path)

    output = run(documented("plait run examples/custom_model/regression.toml"), folder, ONE_ROUND)

    last = records(_run_directory(output, folder))[-1]
    assert last["round"] == 1 and last.get("test_loss", last.get("loss")) > 0 and "accuracy" not in output


def test_secure_aggregation_and_then_secagg_plus(tmp_path):
    """examples/fedavg_secagg.toml's two commands, one after the other in one folder, as a reader runs them."""
    folder = user_folder(tmp_path)

    outputs = [run(documented("plait run examples/fedavg_secagg.toml"), folder, ONE_ROUND),
               run(documented('plait run examples/fedavg_secagg.toml --set fl.strategy.secagg.graph=\\"harary\\" '
                              '--set run.name=\\"secagg_plus\\"'), folder, ONE_ROUND)]

    for output, name in zip(outputs, ("fedavg_secagg", "secagg_plus")):
        run_dir = _run_directory(output, folder)
        assert run_dir.name == name and accuracy(records(run_dir)[-1]) == pytest.approx(printed_accuracy(output),
                                                                                         abs=1e-4)
    assert 'graph = "harary"' in (folder / "runs" / "secagg_plus" / "config.toml").read_text()


def test_shakespeare_runs(tmp_path):
    folder = user_folder(tmp_path)
    # added by the test, beside one round: two local steps, and one thread (run.threads = 2 on cores that other
    # processes share makes each LSTM step several times slower)
    short = [*ONE_ROUND, "--set", "fl.plan.max_steps=2", "--set", "run.threads=1"]

    output = run(documented("plait run examples/shakespeare.toml"), folder, short, timeout=280)

    last = records(_run_directory(output, folder))[-1]
    assert last["round"] == 1 and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)


def test_next_word_runs_reports_top3_and_writes(tmp_path):
    folder = user_folder(tmp_path)

    output = run(documented("plait run examples/next_word.toml"), folder, [*ONE_ROUND, "--set", "fl.plan.max_steps=2"],
                 timeout=280)  # added by the test, beside one round: two local steps

    written = run(documented('plait generate runs/next_word --prompt "to be or not to" --length 20'), folder)

    run_dir = _run_directory(output, folder)
    last = records(run_dir)[-1]
    assert last["round"] == 1 and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)
    assert 0 <= last["test_accuracy"] <= last["test_top3_accuracy"] <= 1
    assert written.startswith("to be or not to ") and len(written.split()) == 5 + 20
    # the README's "FedAvg against each role alone": the example's fl.baselines
    against = json.loads((run_dir / "baselines.json").read_text())
    assert against["fl_accuracy"] == last["test_accuracy"] and 0 <= against["local_accuracy_mean"] <= 1
    # the example caps its clients' steps (fl.plan.max_steps): the baselines count the run's steps
    assert "baselines at the run's steps (capped by fl.plan.max_steps; at most 1 epoch): FL's" in " ".join(
        output.split())


@pytest.mark.timeout(300)
def test_make_demo_runs_its_recipe(tmp_path):
    """`make demo` installs .venv, then runs its recipe: read here from the Makefile, as make would."""
    # Prepare
    recipe = re.search(r"^demo:.*\n\t(.+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(1)
    command = recipe.replace("$(BIN)/plait", "plait")
    assert command == "plait demo", f"the demo recipe changed: {recipe!r}"
    # Execute
    output = run(command, tmp_path, ["--rounds", "1"], timeout=280)  # added by the test: 1 round, not 300
    # Assert: what the README says it prints
    run_dir = _run_directory(output, tmp_path)
    assert printed_accuracy(output) == pytest.approx(accuracy(records(run_dir)[-1]), abs=1e-4)
    plots = [line for line in output.splitlines() if line.startswith("plot: ")]
    assert plots and all((tmp_path / line.removeprefix("plot: ")).exists() for line in plots)
