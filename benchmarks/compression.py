"""Accuracy vs bytes sent for each compression codec on a short FedAvg MNIST run (2NN, shards, C = 0.1).

    .venv/bin/python benchmarks/compression.py --quick     # 20 rounds per codec, about 2-3 minutes
    .venv/bin/python benchmarks/compression.py             # 100 rounds per codec

The reference is the same run without compression (fp32 updates). Every run uses the same seed, so the clients
selected and their local data order are identical; only the uplink codec differs. Headline: int8's upload bytes
over the reference's, goal: a quarter of the bytes at no more than 1 point of accuracy lost. The reference is also
read against each client training alone and one model on all the data, at its compute
(`fl_accuracy_vs_each_client_alone`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from plait.federated.baselines import against_baselines, benchmark_line
from plait.federated.config import FederatedRunConfig
from plait.federated.simulation import build_server
from plait.settings.config import from_dict

CODECS = [("none", {}), ("fp16", {}), ("int8", {}), ("qsgd", {"levels": 16}),
          ("topk", {"ratio": 0.05, "error_feedback": True}), ("randk", {"ratio": 0.25, "error_feedback": True})]


def run(rounds: int, compression: dict, baselines: bool = False) -> dict:
    config = from_dict(FederatedRunConfig, {
        "run": {"name": "bench", "seed": 0, "threads": 1}, "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": 100, "partition": "shards"},
        "fl": {"rounds": rounds, "fraction": 0.1, "min_clients": 10, "eval_every": 0,
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.1}, "compression": compression}})
    server = build_server(config)
    state, bytes_up, started = server.initial_state(), 0, time.perf_counter()
    for _ in range(rounds):
        state, record = server.run_round(state)
        bytes_up += record["bytes_up"]
    out = {"accuracy": record["test_accuracy"], "bytes_up": bytes_up, "seconds": time.perf_counter() - started}
    if baselines:
        out["baselines"] = against_baselines(server, rounds, record["test_accuracy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 20 if args.quick else 100
    results = {}
    for name, options in CODECS:
        results[name] = run(rounds, {"codec": name, **options}, baselines=name == "none")
        r = results[name]
        print(f"{name:6s} {json.dumps(options):42s} accuracy {r['accuracy']:.4f}  "
              f"bytes_up {r['bytes_up'] / 1e6:8.2f} MB"
              f"  ({r['bytes_up'] / results['none']['bytes_up']:.3f}x)  {r['seconds']:.1f} s", flush=True)
    ref = results["none"]
    for name, _ in CODECS[1:]:
        r = results[name]
        print(json.dumps({"benchmark": "compression", "metric": f"{name}_accuracy_after_{rounds}_rounds",
                          "plait": r["accuracy"], "reference": ref["accuracy"],
                          "ratio": r["accuracy"] / ref["accuracy"], "bytes_ratio": r["bytes_up"] / ref["bytes_up"],
                          "goal": "accuracy within 1 point of fp32"}))
    print(json.dumps(benchmark_line("compression", ref["baselines"])))
    r = results["int8"]
    print(json.dumps({"benchmark": "compression", "metric": "int8_bytes_up_over_fp32", "plait": r["bytes_up"],
                      "reference": ref["bytes_up"], "ratio": r["bytes_up"] / ref["bytes_up"],
                      "accuracy_drop_points": 100 * (ref["accuracy"] - r["accuracy"]),
                      "goal": "about 0.25x bytes (1 byte per element + one fp32 scale), accuracy drop <= 1 point"}))


if __name__ == "__main__":
    main()
