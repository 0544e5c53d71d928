"""Whole parameter-server runs: separate server and worker processes over ZeroMQ on 127.0.0.1, launched as
`plait train` does, compared against a single-process reference."""

import time

import numpy as np
import pytest
import torch

from plait.experiment.runs.parameter_server import run_ps
from plait.ps.config import PSRunConfig
from plait.ps.trainer import build_flat_model, load_split, loss_and_grad
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import from_dict


def make_config(tmp_path, name, **sections) -> PSRunConfig:
    """A small run's config, read as a config file's tables are (`sync={"consistency": "bsp"}` and so on)."""
    tables = {"run": {"root": str(tmp_path), "name": name}, "data": {"test_examples": 500},
              "train": {"steps": 8, "batch_size": 16, "eval_every_s": 0.2}, "optimizer": {"name": "sgd", "lr": 0.1}}
    for section, values in sections.items():
        tables.setdefault(section, {}).update(values)
    return from_dict(PSRunConfig, tables)


def single_process_sgd(config: PSRunConfig, num_workers: int) -> np.ndarray:
    """Synchronous SGD in one process: each step, the mean of the workers' gradients on the batches they draw."""
    model, weights, spec = build_flat_model(config)
    shards = [load_split(config, "train", rank, num_workers) for rank in range(num_workers)]
    for step in range(config.train.steps):
        grads = []
        for rank, data in enumerate(shards):
            rng = np.random.default_rng([config.run.seed, rank, step])
            idx = torch.from_numpy(rng.integers(0, len(data.y), config.train.batch_size))
            grads.append(loss_and_grad(model, spec, weights, data.x[idx], data.y[idx])[1])
        weights -= config.optimizer.lr * torch.stack(grads).mean(0)
    return weights.numpy()


def test_bsp_with_one_server_equals_single_process_sgd(tmp_path):
    config = make_config(tmp_path, "bsp1", sync={"servers": 1, "consistency": "bsp"})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    reference = single_process_sgd(config, 2)
    assert summary.failed_workers == [] and summary.max_staleness == {0: 0, 1: 0}
    np.testing.assert_allclose(summary.weights, reference, rtol=0, atol=2e-6)
    assert not np.allclose(summary.weights, build_flat_model(config)[1].numpy(), atol=1e-3)  # it did train
    assert (tmp_path / "bsp1" / "plots" / "loss.png").exists()
    assert list((tmp_path / "bsp1" / "tb").glob("events.out.tfevents.*"))  # the same sinks as every plane
    # canonical metric names (plait.runtime.metric_names): the evaluator's records and each worker's steps
    evals = [r for r in read_metrics(tmp_path / "bsp1" / "metrics.jsonl") if "event" not in r]
    assert set(evals[-1]) == {"step", "test_loss", "test_accuracy", "lr", "elapsed_s", "time", "server_restarts"}
    assert evals[-1]["lr"] == 0.1 and abs(evals[-1]["time"] - time.time()) < 600
    steps = read_metrics(tmp_path / "bsp1" / "worker-0.jsonl")
    assert {"train_loss", "time", "bytes_up", "bytes_down"} <= set(steps[0]) and "loss" not in steps[0]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in steps)  # each step's own traffic


def test_a_run_with_curve_keys_is_the_same_run_encrypted(tmp_path):
    """sync.curve_keys: servers, workers, the launcher's evaluator and its shutdown all speak CurveZMQ; the run ends
    where the plain one ends (BSP, 2 servers)."""
    from plait.ps.security import make_keys

    keys = make_keys(tmp_path / "keys").directory
    config = make_config(tmp_path, "curve", sync={"servers": 2, "consistency": "bsp", "curve_keys": str(keys)})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    assert summary.failed_workers == [] and summary.server_restarts == 0
    # summary.weights are what the launcher's evaluator pulled at the end, over CurveZMQ too
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)
    assert summary.final["step"] == config.train.steps
    for index in range(2):  # the launcher's SHUTDOWN got through: each server wrote its final checkpoint
        events = [r["event"] for r in read_metrics(tmp_path / "curve" / "servers" / f"server-{index}.jsonl")]
        assert events[-2:] == ["checkpoint", "stopped"]
        assert "refused" not in events  # every process used a key whose role allows what it sent (ps/trust.py)


def test_sharded_servers_match_one_server(tmp_path):
    """Three servers, each holding its range of the 199,210 weights as three pieces (at most 25,000 elements,
    pushed and pulled piece by piece), end where one server holding one piece ends."""
    optimizer = {"name": "momentum", "lr": 0.05, "momentum": 0.9}
    one = run_ps(make_config(tmp_path, "one", optimizer=optimizer, sync={"servers": 1, "piece_numel": 0}), 2,
                 timeout_s=240)
    three = run_ps(make_config(tmp_path, "three", optimizer=optimizer, sync={"servers": 3, "piece_numel": 25_000}), 2,
                   timeout_s=240)
    pieces = []
    for index in range(3):
        with np.load(tmp_path / "three" / "servers" / f"server-{index}.npz") as npz:
            pieces.append([npz[name].size for name in npz.files if name.endswith(".param")])
    loads = [sum(sizes) for sizes in pieces]
    assert max(loads) - min(loads) <= 1 and sum(loads) == one.weights.size  # balanced by size
    assert all(len(sizes) == 3 and max(sizes) <= 25_000 for sizes in pieces)
    np.testing.assert_allclose(three.weights, one.weights, rtol=0, atol=1e-6)


def test_killed_server_restarts_from_its_checkpoint_and_the_run_finishes(tmp_path):
    config = make_config(tmp_path, "kill", sync={"servers": 2, "consistency": "bsp", "checkpoint_every": 5,
                                                 "retry_s": 0.3, "piece_numel": 40_000},
                         train={"steps": 60, "eval_every_s": 0.1}, fault={"kill_server": 1, "kill_at_step": 10})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    events = read_metrics(tmp_path / "kill" / "metrics.jsonl")
    assert [e["server"] for e in events if e.get("event") == "server_killed"] == [1]
    assert summary.server_restarts == 1 and summary.failed_workers == []
    server_log = read_metrics(tmp_path / "kill" / "servers" / "server-1.jsonl")
    assert any(e["event"] == "restored" for e in server_log)
    for rank in range(2):  # both workers carried on to the last step without restarting
        steps = [r["step"] for r in read_metrics(tmp_path / "kill" / f"worker-{rank}.jsonl")]
        assert steps == list(range(60))
    evals = [e for e in events if "test_loss" in e]
    assert evals[-1]["step"] == 60 and evals[-1]["test_loss"] < evals[0]["test_loss"]


def test_worker_death_under_ssp_does_not_hang_the_others(tmp_path):
    config = make_config(tmp_path, "death", sync={"servers": 1, "consistency": "ssp:2", "worker_timeout_s": 2.0,
                                                  "max_worker_restarts": 0},  # the dead worker stays dead
                         train={"steps": 40}, fault={"kill_worker": 2, "kill_worker_at_step": 5})
    summary = run_ps(config, num_workers=3, timeout_s=120)
    assert summary.failed_workers == [2]
    state = {}  # a worker stalled by a busy machine may be dropped and rejoin; the dead one stays out
    for event in read_metrics(tmp_path / "death" / "servers" / "server-0.jsonl"):
        if event["event"] in ("dropped", "rejoined", "finished"):
            state[event["worker"]] = event["event"]
    assert state == {0: "finished", 1: "finished", 2: "dropped"}
    for rank in (0, 1):
        steps = [r["step"] for r in read_metrics(tmp_path / "death" / f"worker-{rank}.jsonl")]
        assert steps == list(range(40))
    assert max(r["step"] for r in read_metrics(tmp_path / "death" / "worker-2.jsonl")) == 4
    assert summary.max_staleness[0] <= 2 and summary.max_staleness[1] <= 2


def test_a_dead_worker_is_restarted_and_rejoins_the_bsp_clock(tmp_path):
    """Worker 1 dies at step 8. The launcher restarts it; it resumes where the servers' clocks say: after its last
    push, or, if the servers had dropped it meanwhile, at worker 0's clock (each step takes at least 50 ms, so
    worker 0 is still training when worker 1 is back). Either way the run finishes with every worker at the last
    step, nobody failed, and BSP never read stale weights."""
    steps_total = 80
    config = make_config(tmp_path, "revive", sync={"servers": 2, "consistency": "bsp", "worker_timeout_s": 1.0},
                         train={"steps": steps_total}, straggler={"step_s": 0.05},
                         fault={"kill_worker": 1, "kill_worker_at_step": 8})
    summary = run_ps(config, num_workers=2, timeout_s=240)
    assert summary.failed_workers == [] and summary.worker_restarts == {1: 1}
    events = read_metrics(tmp_path / "revive" / "metrics.jsonl")
    assert [(e["worker"], e["exit_code"]) for e in events if e.get("event") == "worker_restarted"] == [(1, 3)]
    assert [r["step"] for r in read_metrics(tmp_path / "revive" / "worker-0.jsonl")] == list(range(steps_total))
    steps = [r["step"] for r in read_metrics(tmp_path / "revive" / "worker-1.jsonl")]
    assert steps[:8] == list(range(8)) and steps[-1] == steps_total - 1 and steps == sorted(set(steps))
    # Each server tells the restarted worker its clock there: its last push (7), or worker 0's clock if that
    # server had dropped it meanwhile (None: worker 0 had already finished, so nothing to catch up with); the
    # worker goes on after the lowest, so its log may skip steps.
    resumed_at = []
    for index in range(2):
        rejoins = [e for e in read_metrics(tmp_path / "revive" / "servers" / f"server-{index}.jsonl")
                   if e["event"] == "rejoined" and e["worker"] == 1]
        assert all(e["clock"] is None or e["clock"] >= 7 for e in rejoins)
        resumed_at.append(rejoins[0]["clock"] if rejoins and rejoins[0]["clock"] is not None else 7)
    assert steps[8] == min(resumed_at) + 1
    assert summary.max_staleness == {0: 0, 1: 0}
    assert events[-1]["step"] == steps_total and events[-1]["test_loss"] < events[0]["test_loss"]


def test_a_worker_that_dies_before_the_start_barrier_is_restarted_into_it(tmp_path, monkeypatch):
    """Worker 1's first life dies during start-up, before it says it is ready. Its restart joins the start barrier,
    so both workers still train together from step 0: BSP ends exactly as single-process SGD does."""
    import subprocess
    import sys

    from plait.ps import launcher

    start_worker = launcher.LocalCluster._start_worker

    def crash_first_life_of_worker_1(self, rank, restart=0):
        if rank == 1 and restart == 0:
            return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
        return start_worker(self, rank, restart)

    monkeypatch.setattr(launcher.LocalCluster, "_start_worker", crash_first_life_of_worker_1)
    config = make_config(tmp_path, "early", sync={"servers": 1, "consistency": "bsp", "worker_timeout_s": 2.0})
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert summary.worker_restarts == {1: 1} and summary.failed_workers == []
    for rank in range(2):
        assert [r["step"] for r in read_metrics(tmp_path / "early" / f"worker-{rank}.jsonl")] == list(range(8))
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)


def test_a_stalled_worker_that_was_dropped_follows_the_clock_it_is_given(tmp_path):
    """Worker 1 pauses 2.5 s at step 5 (alive, silent); the servers drop it after 1 s and worker 0 trains on alone
    (30 ms steps: it is still training when worker 1 is back). When worker 1 speaks again, BSP moves its clock up to
    worker 0's; its pull's answer says so, and it goes on from there instead of stepping through the clocks
    completed without it."""
    total = 120
    config = make_config(tmp_path, "stall", sync={"servers": 2, "consistency": "bsp", "worker_timeout_s": 1.0},
                         train={"steps": total}, straggler={"step_s": 0.03},
                         fault={"stall_worker": 1, "stall_at_step": 5, "stall_s": 2.5})
    summary = run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    assert summary.failed_workers == [] and summary.worker_restarts == {}
    assert [r["step"] for r in read_metrics(tmp_path / "stall" / "worker-0.jsonl")] == list(range(total))
    steps = [r["step"] for r in read_metrics(tmp_path / "stall" / "worker-1.jsonl")]
    skip = steps.index(5) + 1
    assert steps[:skip] == list(range(6)) and steps[skip] > 10  # it jumped over what worker 0 did alone
    assert steps[skip:] == list(range(steps[skip], total))      # then went on clock by clock to the end
    for index in range(2):  # each server moved it up to worker 0's clock there; it follows the lowest
        rejoined = [e for e in read_metrics(tmp_path / "stall" / "servers" / f"server-{index}.jsonl")
                    if e["event"] == "rejoined" and e["worker"] == 1]  # (worker 0 may be, too, on a busy machine)
        assert len(rejoined) == 1 and rejoined[0]["clock"] >= steps[skip] - 1
    assert summary.max_staleness == {0: 0, 1: 0}


def test_resume_continues_from_the_servers_checkpoints_as_if_never_stopped(tmp_path, capsys):
    """`plait train --resume` on the PS plane: a BSP run stopped after 5 clocks and resumed to 10 ends where
    single-process SGD over 10 steps ends (workers learn their clock from the servers and draw the same batches);
    the logs hold every step once and the evaluator's clock goes on. A resume with another model is refused."""
    config = make_config(tmp_path, "resume", sync={"servers": 2, "consistency": "bsp"}, train={"steps": 5})
    run_ps(config, num_workers=2, timeout_s=240, show_progress=False)
    other = make_config(tmp_path, "resume", sync={"servers": 2, "consistency": "bsp"}, model={"name": "cnn"})
    with pytest.raises(ValueError, match=r"--resume with another experiment \(model.name: '2nn' then, 'cnn' now\)"):
        run_ps(other, num_workers=2, resume=True, timeout_s=240, show_progress=False)
    assert "name = \"2nn\"" in (tmp_path / "resume" / "config.toml").read_text()  # the run's own, kept
    config.train.steps = 10
    capsys.readouterr()
    summary = run_ps(config, num_workers=2, resume=True, timeout_s=240, show_progress=False)
    assert "note: resumed with changed settings: train.steps 5 → 10" in capsys.readouterr().err
    np.testing.assert_allclose(summary.weights, single_process_sgd(config, 2), rtol=0, atol=2e-6)
    for rank in range(2):
        assert [r["step"] for r in read_metrics(tmp_path / "resume" / f"worker-{rank}.jsonl")] == list(range(10))
    evals = [r for r in read_metrics(tmp_path / "resume" / "metrics.jsonl") if "test_loss" in r]
    assert evals[-1]["step"] == 10
    elapsed = [r["elapsed_s"] for r in evals]
    assert elapsed == sorted(elapsed)  # the resumed run's clock goes on from the first part's
