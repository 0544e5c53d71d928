"""Federated simulator speed: FedAvg rounds of the demo setting (MNIST 2NN, 100 clients, C=0.1, E=1, B=10).

Plait's simulator (sequential, thread and process-pool executors) against the reference most users write first: a plain
PyTorch loop that loads the global weights into a model per client and trains it with torch.optim.SGD (the shape of
Flower's PyTorch quickstart client), then averages state_dicts. Same clients, same batches, same machine, one run.

    .venv/bin/python benchmarks/fl_simulator.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from plait.core.flat import load_flat_params
from plait.federated.config import FederatedRunConfig
from plait.federated.pool_executor import ProcessPoolExecutor
from plait.federated.simulation import build_server
from plait.federated.thread_executor import ThreadPoolExecutor
from plait.settings.config import from_dict


def reference_round(model, data, global_params, spec, clients, plans):
    """Plain PyTorch FedAvg round: state_dict in, optimizer loop, state_dict out, averaged."""
    total, weight = None, 0
    for cid in clients:
        load_flat_params(model, global_params, spec)
        opt = torch.optim.SGD(model.parameters(), lr=plans[cid].lr)
        x, y = data.client_train(cid)
        generator = torch.Generator().manual_seed(plans[cid].seed)
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), plans[cid].batch_size):
            idx = order[start : start + plans[cid].batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        state = {k: v.detach().clone() * len(y) for k, v in model.state_dict().items()}
        total = state if total is None else {k: total[k] + state[k] for k in total}
        weight += len(y)
    return {k: v / weight for k, v in total.items()}


def time_rounds(run_round, rounds):
    run_round()  # warm-up (pool start-up, allocator)
    start = time.perf_counter()
    for _ in range(rounds):
        run_round()
    return (time.perf_counter() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=0)
    args = parser.parse_args()
    rounds = args.rounds or (10 if args.quick else 40)
    torch.set_num_threads(1)
    config = from_dict(FederatedRunConfig, {
        "run": {"seed": 0, "threads": 1}, "data": {"num_clients": 100, "partition": "shards"},
        "fl": {"rounds": 10**6, "fraction": 0.1, "min_clients": 10, "eval_every": 0,
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.1}}})
    server = build_server(config)
    server.config.eval_every = 10**6  # time training rounds only
    results = {}

    state = [server.initial_state()]
    def plait_round():
        state[0], _ = server.run_round(state[0])
    results["sequential"] = time_rounds(plait_round, rounds)

    workers = min(2, os.cpu_count() or 1)
    server.executor = ProcessPoolExecutor(server.model, num_workers=workers)
    results["process_pool"] = time_rounds(plait_round, rounds)
    server.executor.close()
    server.executor = ThreadPoolExecutor(server.model, num_workers=workers)
    results["threads"] = time_rounds(plait_round, rounds)
    server.executor.close()

    rng = np.random.default_rng(0)
    ref_params = [server.initial_params.clone()]
    def ref_round():
        clients = sorted(rng.choice(100, 10, replace=False).tolist())
        plans = {cid: server.config.plan.for_client(cid) for cid in clients}
        averaged = reference_round(server.model, server.data, ref_params[0], server.spec, clients, plans)
        ref_params[0] = torch.cat([averaged[name].reshape(-1) for name in server.spec.names])
    results["reference"] = time_rounds(ref_round, rounds)

    for name in ("threads", "process_pool", "sequential"):
        print(json.dumps({"benchmark": "fl_simulator", "metric": f"seconds_per_round_{name}",
                          "plait": round(results[name], 4), "reference": round(results["reference"], 4),
                          "ratio": round(results["reference"] / results[name], 3), "goal": ">= 1.0 (speed-up)"}))


if __name__ == "__main__":
    main()
