"""The simulator past one process: `fl.executor = "distributed"` spreads each round's clients over torch.distributed
ranks (2 gloo ranks here), and the run ends with the sequential simulator's weights, error-feedback residuals
and all, whatever the number of ranks; only rank 0 writes the run directory."""

from __future__ import annotations

import pytest
import torch

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.parallel.launch import spawn_ranks
from plait.runtime.checkpoint import load_checkpoint
from plait.settings.config import from_dict
from tests_support import shapes_config


def _config(tmp_path, name, executor):
    raw = shapes_config(tmp_path, name=name, rounds=3, executor=executor, federated_eval_every=3,
                        compression={"codec": "topk", "ratio": 0.3, "error_feedback": True})
    raw["data"].update(partition="dirichlet", num_clients=7)
    return raw


def _rank(rank, world_size, raw):
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    return summary.final.get("test_accuracy"), summary.final.get("fed_accuracy")


@pytest.mark.timeout(180)
def test_two_ranks_give_the_sequential_weights(tmp_path):
    sequential = run_federated(from_dict(FederatedRunConfig, _config(tmp_path, "seq", "sequential")),
                               show_progress=False)
    results = spawn_ranks(_rank, 2, _config(tmp_path, "dist", "distributed"), backend="gloo", timeout_s=150)
    expected = load_checkpoint(sequential.run_dir / "checkpoint.pt")
    got = load_checkpoint(tmp_path / "runs" / "dist" / "checkpoint.pt")
    torch.testing.assert_close(got["params"], expected["params"], rtol=0, atol=0)
    assert set(got["residuals"]) == set(expected["residuals"])  # every client's error feedback carried over
    assert results[0] == results[1] == (sequential.final["test_accuracy"], sequential.final["fed_accuracy"])


def test_distributed_without_torchrun_says_how_to_start_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        run_federated(from_dict(FederatedRunConfig, _config(tmp_path, "no", "distributed")), show_progress=False)
