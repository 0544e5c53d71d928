"""The part of benchmarks/sim_vs_flower.py that needs torch, run as its own process: write one row's partition
(one .npy pair per client and the test set, as Plait's loader makes it) for the Flower side, and for the CNN time
the two cores' floor. The harness itself stays free of torch: a process that maps torch's libraries takes a share
of their pages from the process trees whose proportional set sizes (PSS) it measures.

    python benchmarks/sim_vs_flower_prepare.py --model cnn --num-clients 100 --out DIR --floor-repeats 3

The last line of output is JSON: {"floor_s": [seconds per repeat, divided by the cores]} (empty without a floor).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plait.core.models import build_model
from plait.data.federated import load_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.selection import target_clients
from plait.federated.task import EVAL_BATCH
from plait.settings.config import from_dict

Tensors = tuple[torch.Tensor, torch.Tensor]


def export_clients(model: str, num_clients: int, folder: Path, seed: int) -> tuple[list[Tensors], Tensors]:
    """Write the partition Plait's loader makes for this row (the harness's run config: MNIST, shards), one .npy
    pair per client and the test set; returns one round's worth of clients' tensors (the floor's round) and the
    test set."""
    config = from_dict(FederatedRunConfig, {"run": {"name": "export", "root": str(folder), "seed": seed},
                                            "model": {"name": model},
                                            "data": {"name": "mnist", "num_clients": num_clients,
                                                     "partition": "shards"},
                                            "fl": {"rounds": 1, "fraction": 0.1}})
    data = load_federated(config.data)
    folder.mkdir(parents=True, exist_ok=True)
    for cid in range(data.num_clients):
        x, y = data.client_train(cid)
        np.save(folder / f"client_{cid}_x.npy", x.numpy())
        np.save(folder / f"client_{cid}_y.npy", y.numpy())
    np.save(folder / "test_x.npy", data.test_x.numpy())
    np.save(folder / "test_y.npy", data.test_y.numpy())
    per_round = target_clients(config.fl.fraction, config.fl.min_clients, data.num_clients)
    return [data.client_train(cid) for cid in range(per_round)], (data.test_x, data.test_y)


def cnn_floor(clients: list[Tensors], test: Tensors, repeats: int, lr: float, batch_size: int,
              seed: int) -> list[float]:
    """Seconds of the plain single-thread loop for one CNN round (train every client from the global model, then
    evaluate the test set), divided by the cores: the least two cores can take without cleverer arithmetic."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build_model("cnn")
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for x, y in clients:
            model.load_state_dict(start_state)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            order = torch.randperm(len(y), generator=generator)
            for begin in range(0, len(y), batch_size):
                idx = order[begin : begin + batch_size]
                optimizer.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():  # in Plait's CPU evaluation batches: 2000 took 1.7x as long for the CNN here
            for begin in range(0, len(test[1]), EVAL_BATCH):
                model(test[0][begin : begin + EVAL_BATCH])
        times.append((time.perf_counter() - started) / (os.cpu_count() or 1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-repeats", type=int, default=0, help="0: no floor")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    clients, test = export_clients(args.model, args.num_clients, Path(args.out), args.seed)
    floor = cnn_floor(clients, test, args.floor_repeats, args.lr, args.batch_size, args.seed) \
        if args.model == "cnn" and args.floor_repeats else []
    print(json.dumps({"floor_s": floor}))


if __name__ == "__main__":
    main()
