"""FedAvg and the robust rules under the huge-update and huge-count attacks, with and without update bounds:
MNIST 2NN, 100 IID clients, 20 per round, 20% attackers (the setting of benchmarks/robust.py).

    .venv/bin/python benchmarks/hostile_updates.py --quick    # 10 rounds per run, a few minutes
    .venv/bin/python benchmarks/hostile_updates.py            # 30 rounds per run

Attacks (benchmarks/robust.py's `run`, `[fl.attack]`):
- huge_update: an attacker sends ±3e38 per coordinate (finite float32);
- huge_count:  an attacker sends −Δ (its honest delta, flipped) and claims 2^62 examples: at its true weight
  20% of −Δ only slows FedAvg down; owning the mean, it undoes the round.
Bounds (`[fl.bounds]`): "off" (no norm bound, no example cap), "absolute" (huge_count only: the default without the
relative weight cap, examples_factor = 0, i.e. the defaults before it existed), "default" (max_norm 1e6, 100× the
recent median norm, max_examples 1e7, each weight at most examples_factor = 2 times the cohort's median declared
count), "tight" (the default plus max_examples = 1000, about what a client of this split holds: 600).
A round whose aggregate is not finite is skipped (on_divergence = "skip"), so every run reports an accuracy.
The reference is clean FedAvg (no attackers) with default bounds, itself read against each client training alone and
one model on all the data at its compute (`fl_accuracy_vs_each_client_alone`).
"""

from __future__ import annotations

import argparse
import json

import torch

from plait.federated.baselines import benchmark_line
from robust import run

BOUNDS = {"off": {"max_norm": 0, "norm_factor": 0, "max_examples": 0, "examples_factor": 0},
          "absolute": {"examples_factor": 0}, "default": {}, "tight": {"max_examples": 1000}}
GOAL = "no hijack behind tight bounds: robust rules within 2 points of clean, FedAvg at its honest-weight figure"
RULES = {"fedavg": {"name": "fedavg"}, "median": {"name": "median"},
         "trimmed_mean": {"name": "trimmed_mean", "trim_fraction": 0.3},
         "multi_krum": {"name": "multi_krum", "byzantine_fraction": 0.3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 10 if args.quick else 30
    reference = run(rounds, RULES["fedavg"], "none", baselines=True)
    clean = reference["accuracy"]
    print(f"clean FedAvg: accuracy {clean:.4f}", flush=True)
    lines = []
    for attack in ("huge_update", "huge_count"):
        for rule, strategy in RULES.items():
            for bounds_name, bounds in BOUNDS.items():
                if bounds_name == "absolute" and attack != "huge_count":
                    continue  # the relative cap bounds weights only: huge_update's figures would repeat "default"
                r = run(rounds, strategy, attack, scale=1.0 if attack == "huge_count" else 4.0, bounds=bounds)
                print(f"{attack:11s} {rule:12s} bounds={bounds_name:8s} accuracy {r['accuracy']:.4f}  refused "
                      f"{r['refused']:3d}  skipped rounds {r['skipped_rounds']:2d}  {r['seconds']:.1f} s", flush=True)
                metric = f"{rule}_accuracy_{attack}_bounds_{bounds_name}"
                lines.append({"benchmark": "hostile_updates", "metric": metric,
                              "plait": r["accuracy"], "reference": clean, "ratio": r["accuracy"] / clean,
                              "refused": r["refused"], "skipped_rounds": r["skipped_rounds"],
                              "goal": GOAL})
    for line in lines:
        print(json.dumps(line))
    print(json.dumps(benchmark_line("hostile_updates", reference["baselines"])))
    worst = min((line for line in lines if line["metric"].endswith("bounds_tight")), key=lambda x: x["plait"])
    print(json.dumps({**worst, "metric": f"worst_accuracy_behind_tight_bounds ({worst['metric']})"}))


if __name__ == "__main__":
    main()
