"""Two torchrun agents ("nodes"), each in its own working directory with no shared file system, run a 2-stage
pipeline; a rank is killed with SIGKILL after a checkpoint; both agents restart their workers, the group resumes
from the checkpoint (stage files fetched over the process group if a rank landed on the other node) and ends with
the weights of an uninterrupted run. Also: the refusal when the agents would share torchrun's store across
restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plait.experiment.runs import pipeline
from plait.runtime.checkpoint import load_checkpoint
from plait.runtime.metrics_log import read_metrics
from tests_support import PIPELINE_KILL_CONFIG as CONFIG

STEPS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent(node: Path, port: int, is_host: bool, env: dict[str, str]) -> subprocess.Popen[str]:
    node.mkdir(parents=True, exist_ok=True)
    (node / "pipe.toml").write_text(CONFIG.format(name="two", root="runs", steps=STEPS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "plait-two-agents", "--rdzv-conf", f"is_host={int(is_host)}",
           "-m", "plait.cli", "train", "pipe.toml"]
    return subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(agents: list[subprocess.Popen[str]], timeout_s: float) -> list[tuple[int | None, str]]:
    out = []
    for proc in agents:
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
        out.append((proc.returncode, output))
    return out


def _find(nodes: list[Path], name: str) -> Path | None:
    return next((n / "runs" / "two" / name for n in nodes if (n / "runs" / "two" / name).exists()), None)


@pytest.mark.slow
def test_two_agents_without_a_shared_directory_resume_after_a_kill(tmp_path):
    straight = tmp_path / "straight.toml"
    straight.write_text(CONFIG.format(name="straight", root=(tmp_path / "runs").as_posix(), steps=STEPS))
    pipeline.main(straight, nproc=2, resume=False, overrides=[], allreduce=None)

    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    nodes, port = [tmp_path / "node0", tmp_path / "node1"], _free_port()
    agents = [_agent(nodes[0], port, True, env)]
    time.sleep(1.0)  # the host agent binds the rendezvous port first
    agents.append(_agent(nodes[1], port, False, env))
    killed_at = None
    try:
        deadline = time.monotonic() + 150
        while killed_at is None and time.monotonic() < deadline and all(a.poll() is None for a in agents):
            metrics, pid = _find(nodes, "metrics.jsonl"), _find(nodes, "ranks/rank1.pid")
            records = read_metrics(metrics) if metrics else []
            if records and records[-1]["step"] >= 40 and _find(nodes, "checkpoint.pt") and pid:
                os.kill(int(pid.read_text()), signal.SIGKILL)  # a real kill of the last stage
                killed_at = records[-1]["step"]
            time.sleep(0.02)
    finally:
        results = _finish(agents, timeout_s=240)
    outputs = "\n".join(f"--- agent {i} (rc {rc}):\n{text[-2500:]}" for i, (rc, text) in enumerate(results))
    assert killed_at is not None and killed_at < STEPS, f"the run ended before the kill:\n{outputs}"
    assert [rc for rc, _ in results] == [0, 0], outputs
    for stage in (0, 1):  # wherever each stage ended, it holds the uninterrupted run's weights
        final = _find(nodes, f"stage{stage}.step{STEPS}.pt")
        assert final is not None, f"no node holds stage {stage}'s final file:\n{outputs}"
        a = load_checkpoint(tmp_path / "runs" / "straight" / f"stage{stage}.step{STEPS}.pt")["model"]
        b = load_checkpoint(final)["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_restarts_across_agents_sharing_torchruns_store_are_refused_with_the_fix(monkeypatch):
    from plait.parallel.launch import attempt_prefix

    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RuntimeError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        attempt_prefix(agent_store=True)
    assert attempt_prefix(agent_store=False) == "plait"  # rank 0 hosts a fresh store each attempt
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert attempt_prefix(agent_store=True) == "plait/attempt1"
