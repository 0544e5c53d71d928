"""Realistic heterogeneity on a virtual clock (issue 13): device latency, availability over time (diurnal, or from
a trace file), and deadlines acting on simulated time; time-to-accuracy in simulated hours in every record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.simulation import build_server
from plait.federated.stragglers import DeviceConfig, DevicePool
from plait.settings.config import ConfigError, from_dict
from tests_support import shapes_config


def test_diurnal_devices_are_online_their_hours_and_only_they_are_selected(tmp_path):
    pool = DevicePool(DeviceConfig(availability="diurnal", online_hours=6), 4000, seed=0)
    share = np.mean([pool.online(h * 3600.0).mean() for h in range(24)])
    assert share == pytest.approx(6 / 24, abs=0.01)
    raw = shapes_config(tmp_path, rounds=3, fraction=0.5,
                        devices={"availability": "diurnal", "online_hours": 12, "step_time_s": 30.0})
    raw["data"]["num_clients"] = 40
    server = build_server(from_dict(FederatedRunConfig, raw))
    online = server.devices.online(0.0)
    assert server.backend.candidates(1).keys() == {cid for cid in range(40) if online[cid]}
    state, record = server.run_round(server.initial_state())
    assert record["eligible"] == int(online.sum()) and record["sim_clock_h"] > 0


def test_a_trace_file_decides_who_is_online(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,start_h,end_h\n0,0,1\n1,0,1\n2,0.5,2\n3,3,4\n")
    pool = DevicePool(DeviceConfig(availability="trace", trace_file=str(trace), trace_period_h=24), 5, seed=0)
    assert pool.online(0.0).tolist() == [True, True, False, False, False]
    assert pool.online(0.75 * 3600).tolist() == [True, True, True, False, False]
    assert pool.online((24 + 3.5) * 3600).tolist() == [False, False, False, True, False]  # the period repeats
    trace.write_text("9,0,1\n")
    with pytest.raises(ValueError, match="trace_file line 1: client 9"):
        DevicePool(DeviceConfig(availability="trace", trace_file=str(trace)), 5, seed=0)
    with pytest.raises(ConfigError, match="needs devices.trace_file"):
        from_dict(FederatedRunConfig, {"fl": {"devices": {"availability": "trace"}}})


def test_latency_past_the_deadline_drops_clients_on_the_virtual_clock(tmp_path):
    # 2 s of latency each way, a 3 s deadline: nobody makes it; the round is skipped and costs the deadline
    raw = shapes_config(tmp_path, rounds=1, devices={"latency_ms": 2000, "deadline_s": 3.0})
    server = build_server(from_dict(FederatedRunConfig, raw))
    state, record = server.run_round(server.initial_state())
    assert record["skipped"] and record["dropped"] == 3 and record["participants"] == 0
    assert record["on_time"] == 0 and record["selected"] == record["on_time"] + record["dropped"]
    assert record["sim_clock_h"] == pytest.approx(3.0 / 3600)


def test_the_clock_goes_on_across_rounds_and_a_resume(tmp_path):
    raw = shapes_config(tmp_path, rounds=4, devices={"step_time_s": 1.0, "speed_sigma": 0.5})
    summary = run_federated(from_dict(FederatedRunConfig, raw), show_progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    clock = [r["sim_clock_h"] for r in records]
    assert clock == sorted(clock) and clock[0] > 0
    assert (summary.run_dir / "plots" / "accuracy_vs_sim_time.png").exists()
    from plait.runtime.checkpoint import load_checkpoint  # a resumed run's clock goes on from the checkpoint

    again = build_server(from_dict(FederatedRunConfig, raw))
    again.load_checkpoint_extra(load_checkpoint(summary.run_dir / "checkpoint.pt"))
    assert again.backend.clock_s / 3600 == pytest.approx(clock[-1])
