"""The documented `plait train` and `torchrun` commands (data parallel, parameter server, pipeline), each run as
written in a copy of examples/, with the ranks the command names, a few steps long: the test appends
`--set train.steps=4`. torchrun's rendezvous port comes from its environment (PET_MASTER_PORT, a free port), not
from a changed command line."""

from __future__ import annotations

import pytest
from as_a_user import (
    accuracy,
    environment,
    free_port,
    printed_accuracy,
    records,
    run,
    synopsis_forms,
    user_folder,
)
from docs_commands import documented

pytestmark = pytest.mark.slow
STEPS = 4
FEW_STEPS = ["--set", f"train.steps={STEPS}"]  # added by the test: 4 steps instead of the config's 300


def _trained(folder, output: str, name: str) -> dict:
    """The last record of runs/NAME, after checking the run printed its directory and reached the last step."""
    assert f"run directory: runs/{name}" in output, output[-3000:]
    last = records(folder / "runs" / name)[-1]
    assert last["step"] == STEPS, last
    return last


DATA_PARALLEL = [*synopsis_forms(documented("plait train examples/data_parallel.toml --nproc 2 "
                                            "[--allreduce ring|tree|naive|native]")),
                 documented("plait train examples/data_parallel.toml --nproc 2 --allreduce ring")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", list(dict.fromkeys(DATA_PARALLEL)))
def test_data_parallel(tmp_path, command):
    """examples/data_parallel.toml's synopsis (without --allreduce and with each algorithm) and the README's row."""
    folder = user_folder(tmp_path)

    output = run(command, folder, FEW_STEPS)

    last = _trained(folder, output, "data_parallel")
    assert 0 < accuracy(last) <= 1 and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)
    assert (folder / "runs" / "data_parallel" / "plots" / "loss.png").exists()


@pytest.mark.timeout(300)
def test_data_parallel_with_your_own_model_and_data(tmp_path):
    """examples/cluster/own_model.toml: the model and data named from spirals.py next to it, trained to the end."""
    folder = user_folder(tmp_path)

    output = run(documented("plait train examples/cluster/own_model.toml --nproc 2"), folder)

    assert "run directory: runs/own_model" in output, output[-3000:]
    last = records(folder / "runs" / "own_model")[-1]
    assert last["step"] == 300 and accuracy(last) > 0.9  # two spirals: 0.5 by chance
    assert accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)


@pytest.mark.timeout(300)
def test_parameter_server_and_its_keys(tmp_path):
    folder = user_folder(tmp_path)

    output = run(documented("plait train examples/parameter_server.toml --nproc 4"), folder, FEW_STEPS)
    keys = run(documented("plait ps keys ps-keys"), folder)

    last = _trained(folder, output, "parameter-server")
    assert "4 worker(s)" in output and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)
    made = {p.relative_to(folder / "ps-keys").as_posix() for p in (folder / "ps-keys").rglob("*") if p.is_file()}
    assert {"server.key", "server.key_secret", "client.key", "client.key_secret"} <= made, (keys, made)


@pytest.mark.timeout(300)
def test_parameter_server_under_torchrun(tmp_path):
    """examples/parameter_server.toml's torchrun command: 1 coordinator, 2 server ranks, 2 worker ranks."""
    folder = user_folder(tmp_path)
    torchrun_env = environment(PET_MASTER_PORT=str(free_port()))  # torchrun reads its options' PET_ variables

    output = run(documented("torchrun --standalone --nproc-per-node 5 -m plait.cli train "
                            "examples/parameter_server.toml"), folder, FEW_STEPS, timeout=200, env=torchrun_env)

    last = _trained(folder, output, "parameter-server")
    assert "2 server(s), 2 worker(s)" in output and accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)


@pytest.mark.timeout(900)
def test_pipeline_variants_one_after_another(tmp_path):
    """examples/pipeline.toml's four commands in one folder, in order, as a reader tries them."""
    # Prepare
    folder = user_folder(tmp_path)
    torchrun_env = environment(PET_MASTER_PORT=str(free_port()))  # torchrun reads its options' PET_ variables
    commands = [
        (documented("plait train examples/pipeline.toml --nproc 4"), "pipeline"),
        (documented("plait train examples/pipeline.toml --nproc 4 --set parallel.stages=2 --set parallel.replicas=2 "
                    "--set run.name=pipeline-2x2"), "pipeline-2x2"),
        (documented("plait train examples/pipeline.toml --nproc 4 --set parallel.mode=model "
                    "--set parallel.micro_batches=1 --set run.name=model-parallel"), "model-parallel"),
        (documented("torchrun --nproc-per-node 4 --max-restarts 1 -m plait.cli train examples/pipeline.toml "
                    "--set run.name=pipeline-torchrun"), "pipeline-torchrun"),
    ]
    for command, name in commands:
        # Execute
        output = run(command, folder, FEW_STEPS, timeout=200, env=torchrun_env)
        # Assert: the run's last step, evaluated; `plait train` prints its summary (under torchrun the ranks
        # print their progress only)
        last = records(folder / "runs" / name)[-1]
        assert last["step"] == STEPS and 0 < accuracy(last) <= 1, last
        if not command.startswith("torchrun"):
            assert f"run directory: runs/{name}" in output, output[-3000:]
            assert accuracy(last) == pytest.approx(printed_accuracy(output), abs=1e-4)
