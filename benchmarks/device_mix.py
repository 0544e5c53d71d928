"""Test accuracy against simulated time for two device mixes (issue 13, point 5): the same FedAvg run on a fleet of
fast, always-online devices and on a fleet of slow, unevenly fast phones online 8 hours a day.

    .venv/bin/python benchmarks/device_mix.py [--quick]

FedAvg, 2NN, real MNIST, 100 clients (pathological non-IID shards), C = 0.1, E = 1, B = 10, lr 0.05, test-set
evaluation every other round; the virtual clock (fl.devices) says how long each round took. Writes
docs/plots/device_mix.png (--quick: runs/device_mix_quick.png); the last line is JSON: simulated hours to 85% test
accuracy, phones against fast devices.
Each mix's run is also read against each client training alone and one model on all the data, at the compute of its
rounds (`fl_accuracy_vs_each_client_alone`; the same baselines for both mixes: devices change who reports and when,
not what a client alone or one model on all the data learns).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.85
MIXES = {
    "fast devices, always online": {"speed_sigma": 0.3, "step_time_s": 0.01, "bandwidth_mbps": 50,
                                    "latency_ms": 20},
    "phones: slow, uneven, online 8 h a day": {"speed_sigma": 1.0, "step_time_s": 0.05, "bandwidth_mbps": 5,
                                               "latency_ms": 200, "availability": "diurnal", "online_hours": 8,
                                               "deadline_s": 60.0, "p_charging": 0.7},
}


def run(devices: dict, rounds: int, baselines: bool = False) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """(simulated hours, test accuracy) after each evaluated round; with `baselines`, the run against them."""
    from plait.federated.baselines import against_baselines
    from plait.federated.config import FederatedRunConfig
    from plait.federated.simulation import build_server
    from plait.settings.config import from_dict

    eligibility = {"charging": True} if "p_charging" in devices else {}
    config = from_dict(FederatedRunConfig, {
        "run": {"seed": 0, "threads": 1}, "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": 100, "partition": "shards"},
        "fl": {"rounds": rounds, "fraction": 0.1, "min_clients": 2, "over_selection": 0.3, "eval_every": 2,
               "eligibility": eligibility, "plan": {"epochs": 1, "batch_size": 10, "lr": 0.05}, "devices": devices}})
    server = build_server(config)
    state, curve = server.initial_state(), []
    for _ in range(rounds):
        state, record = server.run_round(state)
        if "test_accuracy" in record:
            curve.append((record["sim_clock_h"], record["test_accuracy"]))
    summary = against_baselines(server, rounds, curve[-1][1]) if baselines else {}
    server.close()
    return curve, summary


def hours_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((hours for hours, accuracy in curve if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 rounds instead of 60")
    parser.add_argument("--out", default="", help="the plot (default: docs/plots/device_mix.png for the full run, "
                                                  "runs/device_mix_quick.png for --quick)")
    args = parser.parse_args()
    args.out = args.out or str(REPO / ("runs/device_mix_quick.png" if args.quick else "docs/plots/device_mix.png"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rounds = 20 if args.quick else 60
    runs = [run(devices, rounds, baselines=not i) for i, devices in enumerate(MIXES.values())]
    curves = {name: curve for name, (curve, _) in zip(MIXES, runs)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve in curves.items():
        ax.plot([h for h, _ in curve], [a for _, a in curve], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("simulated time (hours, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"FedAvg 2NN, MNIST, 100 non-IID clients, C = 0.1: {rounds} rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    fast, phones = (hours_to(curve, TARGET) for curve in curves.values())
    for name, curve in curves.items():
        reached = hours_to(curve, TARGET)
        print(f"{name}: {curve[-1][1]:.3f} test accuracy after {curve[-1][0]:.2f} simulated hours; "
              f"{TARGET:.0%} at {reached if reached is None else f'{reached:.2f} h'}")
    print(f"wrote {args.out}")
    from plait.federated.baselines import benchmark_line, compared

    for name, curve in curves.items():
        print(json.dumps({**benchmark_line("device_mix", compared(curve[-1][1], runs[0][1])), "mix": name}))
    print(json.dumps({"benchmark": "device_mix", "metric": f"sim_hours_to_{TARGET:.0%}_phones_vs_fast",
                      "plait": round(phones, 4) if phones else None, "reference": round(fast, 4) if fast else None,
                      "ratio": round(phones / fast, 2) if phones and fast else None, "goal": None}))


if __name__ == "__main__":
    main()
