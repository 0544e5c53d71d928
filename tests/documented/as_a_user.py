"""Running a documented command as a user would: in a folder of their own holding a copy of examples/, as a real
process, with the checked-out package (never an installed one) and never in the repository's runs/.

`plait` is spelled `python -m plait.cli` (the installed script may point at another checkout), `python` is this
interpreter and `torchrun` is `python -m torch.distributed.run`. What a test adds to a command to keep it short
(`--set fl.rounds=1`, ...) is passed as `extra` and appended after the documented words, never mixed into them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPELLING = {"plait": [sys.executable, "-m", "plait.cli"], "python": [sys.executable],
            "torchrun": [sys.executable, "-m", "torch.distributed.run"]}


def user_folder(tmp_path: Path) -> Path:
    """A user's working folder: a copy of examples/ (the commands name examples/...) and nothing else."""
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return tmp_path


def environment(**more: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **more)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def argv(command: str, extra: list[str] = ()) -> list[str]:
    words = shlex.split(command)
    assert words[0] in SPELLING, f"no way to run {words[0]!r} here: {command!r}"
    return [*SPELLING[words[0]], *words[1:], *extra]


def run(command: str, cwd: Path, extra: list[str] = (), *, timeout: float = 240, env: dict[str, str] | None = None
        ) -> str:
    """Run `command` (+ `extra`) to its end in `cwd`; its output, after checking that it exited with 0."""
    done = subprocess.run(argv(command, extra), cwd=cwd, env=env or environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command!r} + {extra} exited with {done.returncode}:\n{done.stdout[-4000:]}"
    return done.stdout


def start(command: str, cwd: Path, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    """Start `command` (+ `extra`) in the background, its output going to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv(command, extra), cwd=cwd, env=environment(), stdout=out,
                                stderr=subprocess.STDOUT)


def finish(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Each process's exit code once it ends within one shared `timeout` (None: it did not, and was killed)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    stop(processes)
    return codes


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float, log: Path) -> Path:
    """Wait until `process` writes `path`; fail early, with its log, if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode} before writing {path}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s:\n{tail(log)}"
        time.sleep(0.1)
    return path


def server_address(run_dir: Path, server: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """HOST:PORT of a `plait fl server` started with net.port = 0 (it writes the port it got to server.json)."""
    info_path = wait_for_file(run_dir / "server.json", server, timeout, log)
    for _ in range(50):  # written atomically in practice; a partial read is retried
        try:
            info = json.loads(info_path.read_text())
            return f"127.0.0.1:{info['port']}"
        except (json.JSONDecodeError, KeyError):
            time.sleep(0.1)
    raise AssertionError(f"unreadable {info_path}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


def fill(command: str, **placeholders: str) -> str:
    """`command` with each placeholder word (a whole word: K, NAME) replaced, e.g. fill(cmd, K="0")."""
    for word, value in placeholders.items():
        command = re.sub(rf"\b{re.escape(word)}\b", value, command)
    return command


def synopsis_forms(command: str) -> list[str]:
    """The commands a synopsis stands for: `cmd [--opt a|b]` is `cmd`, `cmd --opt a` and `cmd --opt b`."""
    match = re.search(r"\s*\[(\S+) ([^\]]+)\]", command)
    if not match:
        return [command]
    bare = command[: match.start()] + command[match.end():]
    return [bare] + [f"{bare} {match.group(1)} {choice}" for choice in match.group(2).split("|")]


def records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per line."""
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no {path}; the run directory holds {sorted(p.name for p in run_dir.iterdir())}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy(record: dict[str, Any]) -> float:
    """The test accuracy of a metrics record, under its canonical name or the older one (metric_names.py)."""
    value = record.get("test_accuracy", record.get("accuracy"))
    assert value is not None, f"no test accuracy in {record}"
    return float(value)


def printed_accuracy(output: str) -> float:
    """The test accuracy a command printed ("test accuracy: 0.91", "accuracy 0.91")."""
    found = re.findall(r"accuracy:? (\d+\.\d+)", output)
    assert found, f"no accuracy printed:\n{output[-3000:]}"
    return float(found[-1])
