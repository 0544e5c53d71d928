"""Shared pieces of the tests: the `plait` command run in-process, the user-code example (examples/custom_model), a
torchrun kill harness, and the pipeline run the restart tests kill."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model"
SHAPES = f"{EXAMPLE / 'shapes.py'}"


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    output: str  # stdout and stderr as they were written, interleaved


class _Both(io.StringIO):
    """A stream that also copies what it is given to `into` (the interleaved output)."""

    def __init__(self, into: io.StringIO):
        super().__init__()
        self.into = into

    def write(self, text: str) -> int:
        self.into.write(text)
        return super().write(text)


def run_plait(*args: str) -> CliResult:
    """`plait ARGS...` in this process, its output captured: the exit code it would give (0 when it returns)."""
    from plait.cli import app

    both = io.StringIO()
    out, err = _Both(both), _Both(both)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app([str(a) for a in args])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if isinstance(done.code, str):
                err.write(done.code + "\n")  # what the interpreter would print
    return CliResult(code, out.getvalue(), err.getvalue(), both.getvalue())


def shapes_config(tmp_path, name="shapes", **fl) -> dict:
    return {"run": {"name": name, "root": str(tmp_path / "runs"), "seed": 1, "threads": 1},
            "model": {"factory": f"{SHAPES}:make_net"},
            "data": {"source": f"{SHAPES}:load", "num_clients": 6, "partition": "iid", "eval_fraction": 0.1},
            "fl": {"rounds": 2, "fraction": 0.5, "min_clients": 2, "plan": {"batch_size": 16, "lr": 0.05}, **fl}}


def torchrun_and_kill_rank(module_args: list[str], cwd: Path, run_dir: Path, after_step: int, *,
                           wait_s: float = 90, finish_s: float = 120) -> tuple[int | None, int | None, str]:
    """Start `torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m MODULE_ARGS...`, SIGKILL rank 1 once the
    run's metrics reach `after_step` with a checkpoint written, and let torchrun restart the group. Returns
    (the step it was killed at, or None; the exit code; the output)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from plait.runtime.metrics_log import read_metrics

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", *module_args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + wait_s
        while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
            records = read_metrics(run_dir / "metrics.jsonl")
            if records and records[-1]["step"] >= after_step and (run_dir / "checkpoint.pt").exists():
                os.kill(int((run_dir / "ranks" / "rank1.pid").read_text()), signal.SIGKILL)  # a real kill
                killed_at = records[-1]["step"]
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=finish_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return killed_at, proc.returncode, output


# A 2-stage 1F1B pipeline run that checkpoints every 20 steps: the restart tests kill one of its ranks.
PIPELINE_KILL_CONFIG = """
[run]
name = "{name}"
root = "{root}"
seed = 3
[model]
name = "mlp"
depth = 4
hidden = 64
[data]
batch_size = 32
[train]
steps = {steps}
lr = 0.05
log_every = 1
eval_every = 0
checkpoint_every = 20
[parallel]
mode = "pipeline"
stages = 2
micro_batches = 4
schedule = "1f1b"
"""
