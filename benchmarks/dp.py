"""DP-FedAvg: accuracy vs ε, and what DP buys against a membership-inference attack.

    .venv/bin/python benchmarks/dp.py --quick     # a few minutes
    .venv/bin/python benchmarks/dp.py             # more rounds

Part 1, accuracy vs ε: MNIST 2NN, 1000 IID clients, 100 per round (q = 0.1), server momentum 0.9, central DP with
clip norm 0.5 and noise multipliers z = 0.5, 1, 2; the reference is the same FedAvgM run without clipping or noise.
ε at δ = 1e-5 from dp-accounting's RDP accountant. The reference is also read against each client training alone
and one model on all the data, at its compute (`fl_accuracy_vs_each_client_alone`): what FL is worth here at all.

Part 2, membership inference (Yeom et al.'s loss threshold): a model that overfits, 20 clients holding 50 MNIST
training examples each, all clients every round, 5 local epochs. Members are those 1000 training examples,
non-members 1000 test examples. The reference is the model trained without DP; the headline is the attack
advantage (TPR − FPR) with DP over without.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from plait.core.models import build_model
from plait.data.federated import DataConfig, FederatedData, load_federated
from plait.federated.baselines import against_baselines, benchmark_line
from plait.federated.config import FederatedRunConfig, FLConfig
from plait.federated.executor import SequentialExecutor
from plait.federated.privacy.audit import membership_audit
from plait.federated.server import FederatedServer
from plait.federated.simulation import build_server
from plait.settings.config import from_dict


def accuracy_vs_epsilon(rounds: int, noise_multiplier: float | None, baselines: bool = False) -> dict:
    privacy = ({"mode": "central", "clip_norm": 0.5, "noise_multiplier": noise_multiplier}
               if noise_multiplier is not None else {})
    config = from_dict(FederatedRunConfig, {
        "run": {"name": "bench", "seed": 0, "threads": 1}, "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": 1000, "partition": "iid"},
        "fl": {"rounds": rounds, "fraction": 0.1, "min_clients": 10, "eval_every": 0,
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.1},
               "strategy": {"weighting": "uniform"}, "server_opt": {"momentum": 0.9}, "privacy": privacy}})
    server = build_server(config)
    state, started = server.initial_state(), time.perf_counter()
    for _ in range(rounds):
        state, record = server.run_round(state)
    out = {"accuracy": record["test_accuracy"], "epsilon": record.get("epsilon", float("inf")),
           "seconds": time.perf_counter() - started}
    if baselines:
        out["baselines"] = against_baselines(server, rounds, record["test_accuracy"])
    return out


def audit(rounds: int, noise_multiplier: float | None) -> dict:
    full = load_federated(DataConfig(name="mnist", num_clients=1, partition="iid"))
    train_x, train_y = full.client_train(0)  # all 60,000 as model inputs (the stored rows are uint8 images)
    members = torch.from_numpy(np.random.default_rng(0).permutation(len(train_y))[:1000])
    x, y = train_x[members], train_y[members]
    test_x, test_y = full.test_x[:1000], full.test_y[:1000]
    parts = [np.arange(i * 50, (i + 1) * 50) for i in range(20)]
    data = FederatedData(x, y, test_x, test_y, parts, 0.0, 0, num_classes=10)
    privacy = ({"mode": "central", "clip_norm": 1.0, "noise_multiplier": noise_multiplier}
               if noise_multiplier is not None else {})
    config = from_dict(FLConfig, {"rounds": rounds, "fraction": 1.0, "min_clients": 20, "eval_every": 0,
                                  "plan": {"epochs": 5, "batch_size": 10, "lr": 0.1},
                                  "strategy": {"weighting": "uniform"}, "privacy": privacy})
    torch.manual_seed(0)
    model = build_model("2nn")
    server = FederatedServer(config, model, data, SequentialExecutor(), seed=0)
    state = server.initial_state()
    for _ in range(rounds):
        state, record = server.run_round(state)
    out = membership_audit(model, server.spec, state.params, (x, y), (test_x, test_y))
    out.update(accuracy=record["test_accuracy"], epsilon=record.get("epsilon", float("inf")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 20 if args.quick else 60
    curve = {}
    for z in (None, 2.0, 1.0, 0.5):
        curve[z] = r = accuracy_vs_epsilon(rounds, z, baselines=z is None)
        print(f"accuracy vs eps: z={z}  epsilon {r['epsilon']:.2f}  accuracy {r['accuracy']:.4f}  "
              f"{r['seconds']:.1f} s", flush=True)
    audit_rounds = 15 if args.quick else 40
    plain = audit(audit_rounds, None)
    print(f"audit without DP: advantage {plain['advantage']:.3f} (best threshold {plain['best_advantage']:.3f}), "
          f"member loss {plain['member_loss']:.3f}, non-member loss {plain['nonmember_loss']:.3f}, "
          f"accuracy {plain['accuracy']:.4f}", flush=True)
    private = {}
    for z in (1.0, 0.5):
        private[z] = p = audit(audit_rounds, z)
        print(f"audit with DP z={z}: epsilon {p['epsilon']:.1f}  advantage {p['advantage']:.3f} (best threshold "
              f"{p['best_advantage']:.3f}), member loss {p['member_loss']:.3f}, non-member loss "
              f"{p['nonmember_loss']:.3f}, accuracy {p['accuracy']:.4f}", flush=True)
    ref = curve[None]
    for z in (2.0, 1.0, 0.5):
        r = curve[z]
        print(json.dumps({"benchmark": "dp", "metric": f"accuracy_at_z{z}_{rounds}_rounds", "plait": r["accuracy"],
                          "epsilon": r["epsilon"], "reference": ref["accuracy"],
                          "ratio": r["accuracy"] / ref["accuracy"],
                          "goal": "accuracy vs epsilon curve (no fixed goal)"}))
    print(json.dumps(benchmark_line("dp", ref["baselines"])))
    p = private[1.0]
    print(json.dumps({"benchmark": "dp", "metric": "membership_advantage_with_dp_z1", "plait": p["advantage"],
                      "epsilon": p["epsilon"], "reference": plain["advantage"],
                      "ratio": p["advantage"] / plain["advantage"] if plain["advantage"] else None,
                      "goal": "DP lowers the attack advantage"}))


if __name__ == "__main__":
    main()
