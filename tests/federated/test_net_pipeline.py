"""The update pipeline over gRPC with real processes on 127.0.0.1: clients run local DP and compression (top-k with
error feedback kept in the client process across rounds), the server decompresses and runs central DP with the
simulator's accounting. Each run ends with the in-process simulation's model and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from plait.federated.net.local import run_against_simulation, small_config
from plait.federated.privacy.accounting import epsilon_after

NUM_CLIENTS = 3


def run_both(tmp_path, raw):
    """The networked run (server + NUM_CLIENTS client processes) and the simulation of the same config."""
    run = run_against_simulation(raw, tmp_path, NUM_CLIENTS)
    assert run.server_code == 0, run.log("server.log")
    assert run.client_codes == [0] * NUM_CLIENTS, [run.log(f"client{c}.log") for c in range(NUM_CLIENTS)]
    return run.records, run.ref_records, run.checkpoint, run.reference, run.initial


@pytest.mark.timeout(150)
def test_local_dp_and_topk_with_error_feedback_match_simulation(tmp_path):
    # Prepare: every client in every round, so each one's error-feedback residual carries over twice.
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=3)
    raw["fl"].update(fraction=1.0, privacy={"mode": "local", "clip_norm": 0.5, "noise_multiplier": 0.01,
                                                    "seeded_noise": True},
                     compression={"codec": "topk", "ratio": 0.05, "error_feedback": True})
    # Execute
    records, ref_records, ckpt, reference, initial = run_both(tmp_path, raw)
    # Assert: bytes_up is the codec's payload (k int32 indices + k float32 values per client), as simulated.
    numel = initial.numel()
    k = math.ceil(0.05 * numel)
    assert [r["bytes_up"] for r in records] == [r["bytes_up"] for r in ref_records] == [NUM_CLIENTS * k * 8] * 3
    assert [r["participants"] for r in records] == [NUM_CLIENTS] * 3
    # ε of local DP (multiplier z/2, no sampling) per round, as the simulator reports it
    assert [r["epsilon"] for r in records] == pytest.approx([r["epsilon"] for r in ref_records])
    assert records[0]["epsilon"] == pytest.approx(epsilon_after(1, 0.005, 1.0, 1e-5))
    # the same noised, sparsified, error-corrected updates: the same model (up to float summation order)
    torch.testing.assert_close(ckpt["params"], reference.params, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ckpt["params"], initial, atol=1e-4)


@pytest.mark.timeout(150)
def test_central_dp_reports_epsilon_each_round_and_stops_at_budget(tmp_path):
    # Prepare: a budget that allows 2 rounds of 3 (z = 1, q = 1): the third round must not run.
    z, delta = 1.0, 1e-5
    budget = (epsilon_after(2, z, 1.0, delta) + epsilon_after(3, z, 1.0, delta)) / 2
    raw = small_config(tmp_path / "runs", num_clients=NUM_CLIENTS, rounds=3)
    raw["fl"].update(fraction=1.0, strategy={"name": "fedavg", "weighting": "uniform"},
                     privacy={"mode": "central", "clip_norm": 0.3, "noise_multiplier": z, "delta": delta,
                              "epsilon_budget": budget, "adaptive": True, "clipped_count_stddev": 1.0,
                              "seeded_noise": True})
    # Execute
    records, ref_records, ckpt, reference, initial = run_both(tmp_path, raw)
    # Assert: ε after each released round, the budget stop, the adaptive clip norm, the simulator's model.
    assert [r["round"] for r in records] == [r["round"] for r in ref_records] == [1, 2, 3]
    assert [r["epsilon"] for r in records] == pytest.approx([epsilon_after(n, z, 1.0, delta) for n in (1, 2, 2)])
    assert [bool(r.get("stop")) for r in records] == [False, False, True]
    assert [r["participants"] for r in records] == [NUM_CLIENTS, NUM_CLIENTS, 0]
    assert records[0]["dp_clip_norm"] == pytest.approx(0.3)
    assert records[1]["dp_clip_norm"] == pytest.approx(ref_records[1]["dp_clip_norm"])
    assert records[1]["dp_clip_norm"] != pytest.approx(0.3)  # adaptive clipping moved it, as simulated
    assert ckpt["opt_state"]["dp_rounds"] == 2
    torch.testing.assert_close(ckpt["params"], reference.params, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ckpt["params"], initial, atol=1e-4)
