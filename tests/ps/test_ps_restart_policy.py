"""The worker restart policy both supervisors follow (the local launcher and a worker's torchrun rank): restart a
worker that died up to sync.max_worker_restarts times, each worker counted on its own; never one that diverged."""

import json

from plait.ps.restart_policy import Decision, Outcome, WorkerRestartPolicy


def test_a_dead_worker_is_restarted_up_to_the_limit_then_failed_each_worker_on_its_own(tmp_path):
    policy = WorkerRestartPolicy(max_restarts=2, num_workers=2, run_dir=tmp_path)
    assert [policy.after_exit(1, -9).outcome for _ in range(3)] == [Outcome.RESTART, Outcome.RESTART, Outcome.FAILED]
    assert policy.restarts == [0, 2]
    assert policy.after_exit(0, 3) == Decision(Outcome.RESTART)  # worker 0 still has its own restarts
    assert policy.restarts == [1, 2]


def test_a_worker_that_finished_is_done_and_costs_no_restart(tmp_path):
    policy = WorkerRestartPolicy(max_restarts=0, num_workers=1, run_dir=tmp_path)
    assert policy.after_exit(0, 0) == Decision(Outcome.DONE)
    assert policy.after_exit(0, 1) == Decision(Outcome.FAILED)  # with 0 restarts allowed, a death is a failure
    assert policy.restarts == [0]


def test_a_worker_that_diverged_is_never_restarted_and_its_record_comes_with_the_decision(tmp_path):
    record = {"event": "diverged", "step": 4, "worker": 1, "reason": "gradient not finite"}
    (tmp_path / "worker-1.jsonl").write_text(json.dumps({"step": 3}) + "\n" + json.dumps(record) + "\n")
    policy = WorkerRestartPolicy(max_restarts=3, num_workers=2, run_dir=tmp_path)
    assert policy.after_exit(1, 1) == Decision(Outcome.DIVERGED, record)
    assert policy.restarts == [0, 0]
    (tmp_path / "worker-1.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({"step": 5}) + "\n")
    assert policy.after_exit(1, 1).outcome is Outcome.RESTART  # only a last record that says so counts
