"""The Flower side of benchmarks/sim_vs_flower.py: FedAvg rounds in Flower's Ray simulation on the clients' arrays
that Plait materialised, with Plait's model definitions (plait.core.models imports torch only).

Run by sim_vs_flower.py with the Flower virtual environment's python, never with the project's:

    .venv-flower/bin/python benchmarks/flower_reference.py --data DIR --model 2nn --rounds 4 --out rounds.jsonl

DIR holds client_<i>_x.npy / client_<i>_y.npy per client and test_x.npy / test_y.npy. One JSON line per round goes
to --out as the round's results are known: {"round", "time" (Unix), "accuracy", "loss"}. The client is written the
way Flower's PyTorch quickstart writes it (Message API: ClientApp / ServerApp, the FedAvg strategy's `start`,
centralised evaluation through `evaluate_fn`), with 2 actors of one CPU each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from plait.core.models import build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder of the clients' .npy arrays")
    parser.add_argument("--model", choices=["2nn", "cnn"], required=True)
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actors", type=int, default=2, help="Ray actors: the machine's CPUs, one CPU each")
    parser.add_argument("--out", required=True, help="JSON lines, one per round")
    return parser.parse_args()


ARGS = parse_args()
DATA = Path(ARGS.data)


def load_client(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's arrays, read at each call as a Flower ClientApp reads its partition (the files stay in the
    page cache; caching them in the actor would grow its memory with every client it has seen)."""
    return (torch.from_numpy(np.load(DATA / f"client_{partition_id}_x.npy")),
            torch.from_numpy(np.load(DATA / f"client_{partition_id}_y.npy")))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one actor per CPU: two threads each would oversubscribe the cores
    partition_id = int(context.node_config["partition-id"])
    config = msg.content["config"]
    model = build_model(ARGS.model)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_client(partition_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    seed = ARGS.seed * 1_000_003 + int(config["server-round"]) * 10_007 + partition_id  # per client and round
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_sum = 0.0
    for _ in range(ARGS.epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), ARGS.batch_size):
            idx = order[start : start + ARGS.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
    metrics = MetricRecord({"train_loss": loss_sum / (ARGS.epochs * len(y)), "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(ARGS.seed)  # the same initial global model as Plait's (seeded, then built)
    model = build_model(ARGS.model)
    test_x = torch.from_numpy(np.load(DATA / "test_x.npy"))
    test_y = torch.from_numpy(np.load(DATA / "test_y.npy"))
    out = open(ARGS.out, "a", encoding="utf-8")

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # Plait evaluates after each round, not before the first
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(test_y), 2000):  # Plait's evaluation batch
                logits = model(test_x[start : start + 2000])
                loss += F.cross_entropy(logits, test_y[start : start + 2000], reduction="sum").item()
                correct += int((logits.argmax(1) == test_y[start : start + 2000]).sum())
        record = {"round": server_round, "time": time.time(), "accuracy": correct / len(test_y),
                  "loss": loss / len(test_y)}
        out.write(json.dumps(record) + "\n")
        out.flush()
        return MetricRecord({"accuracy": record["accuracy"], "loss": record["loss"]})

    strategy = FedAvg(fraction_train=ARGS.fraction, fraction_evaluate=0.0, min_train_nodes=2,  # Plait's fl.min_clients
                      min_available_nodes=ARGS.num_clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=ARGS.rounds,
                   train_config=ConfigRecord({"lr": ARGS.lr}), evaluate_fn=evaluate)
    out.close()


if __name__ == "__main__":
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=ARGS.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": ARGS.actors}})
