"""The cost of shipping the training program (net.ship_program) against clients that import the model's code.

    .venv/bin/python benchmarks/shipped_program.py            # 3 repetitions, 6 networked rounds per run
    .venv/bin/python benchmarks/shipped_program.py --quick    # 1 repetition, 3 rounds

1. In one process, per model (the example's CNN with BatchNorm and dropout, and the FedAvg paper's CNN): the
   program's bytes (its graphs as JSON, its initial weights) against one round's weights down, the server's tracing
   time, the client's reading time (hash, parse, build), and one client's local training (5 epochs of 200
   examples, batch 16: 65 steps) and evaluation, imported module against the shipped program's graphs (median of
   the repetitions, the two alternated).
2. Over real gRPC on 127.0.0.1: the example over the network (a server process, 3 client processes, each with its
   own folder), imported code against clients without the source; seconds per round (the median over rounds 2..R,
   from the server's records), round 1's seconds (the program's download included, but mostly the client processes
   starting up, which both sides pay), and the bytes sent down.

Rows are JSON lines; the headline lines follow the house format (plait = shipped, reference = imported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from plait.core.models import build_model
from plait.federated.client_update import ClientData, client_update
from plait.federated.evaluate import evaluate
from plait.federated.net.local import cluster, read_records, small_config, write_config
from plait.federated.plan import TrainingPlan
from plait.federated.shipping.container import program_sha256
from plait.federated.shipping.model import check_program_fits, load_program
from plait.federated.shipping.trace import export_program
from plait.federated.task import Task
from plait.federated.weights import flat_model_state
from plait.user_code import resolve

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model"
# the example's model (the imported-code side) and its client folders, as a config would name them
make_images = resolve(f"{EXAMPLE / 'shapes.py'}:make_images", "benchmark")
make_net = resolve(f"{EXAMPLE / 'shapes.py'}:make_net", "benchmark")
write_client_folders = resolve(f"{EXAMPLE / 'write_client_folders.py'}:write", "benchmark")

NUM_CLIENTS = 3
EPOCHS = 5  # local epochs timed in part 1: 65 steps of batch 16


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median seconds of each function, run alternately (the machine's load falls on each alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(ts), 4) for name, ts in times.items()}


def in_process(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    start = time.perf_counter()
    program = export_program(model, Task(), x, y, name)
    trace_s = time.perf_counter() - start
    sha = program_sha256(program)
    shipped, task = load_program(program, sha, 1 << 30)
    check_program_fits(shipped, task, x, y)
    weights, spec = flat_model_state(model, buffers=True)
    data, plan = ClientData(x, y), TrainingPlan(epochs=EPOCHS, batch_size=16, lr=0.05, seed=1)
    client_update(model, spec, weights, data, plan, Task())  # warm-up of both paths
    client_update(shipped, spec, weights, data, plan, task)
    state_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    timed = median_times({
        "read_s": lambda: load_program(program, sha, 1 << 30),
        "train_s_imported": lambda: client_update(model, spec, weights, data, plan, Task()),
        "train_s_shipped": lambda: client_update(shipped, spec, weights, data, plan, task),
        "eval_s_imported": lambda: evaluate(model, spec, weights, x, y, Task()),
        "eval_s_shipped": lambda: evaluate(shipped, spec, weights, x, y, task)}, repeats)
    return {"part": "in_process", "model": name, "params": spec.numel(), "program_bytes": len(program),
            "weights_bytes_per_round": spec.numel() * 4, "state_bytes": state_bytes,
            "graphs_and_header_bytes": len(program) - state_bytes, "trace_s": round(trace_s, 3),
            "local_steps": plan.num_steps(len(y)), **timed}


def networked(work: Path, ship: bool, rounds: int, rep: int) -> dict:
    """One run of the example over gRPC (clients' folders in work/clients); the per-round figures from the server's
    metrics."""
    root = work / f"rep{rep}" / ("shipped" if ship else "imported")
    raw = small_config(root / "runs", num_clients=NUM_CLIENTS, rounds=rounds, ship_program=ship, poll_s=0.5)
    raw["model"] = {"factory": f"{EXAMPLE / 'shapes.py'}:make_net"}
    raw["data"] = {"test_path": str(work / "clients" / "test.npz"), "num_clients": NUM_CLIENTS}
    raw["fl"].update(fraction=1.0, eval_every=0, plan={"batch_size": 16, "lr": 0.05})
    root.mkdir(parents=True)
    path = write_config(root / "fl.toml", raw)
    client_config = write_config(root / "client.toml", {k: v for k, v in raw.items() if k != "model"} if ship else raw)

    def client_args(cid):
        return {"extra": ["--data-path", str(work / "clients" / f"client-{cid}"), "--data", str(client_config)]}

    run_dir = root / "runs" / "net"
    try:
        with cluster(path, root, run_dir, NUM_CLIENTS, client_args) as (server, _, clients):
            if server.wait(timeout=300) != 0 or any(c.wait(timeout=60) != 0 for c in clients):
                raise RuntimeError("a process failed")
    except RuntimeError as err:
        raise RuntimeError(f"the networked run failed ({err}): {(root / 'server.log').read_text()[-2000:]}") from err
    records = read_records(run_dir)
    return {"seconds_per_round": statistics.median(r["wall_s"] for r in records[1:]),
            "first_round_s": records[0]["wall_s"], "bytes_down_first_round": records[0]["bytes_down"],
            "bytes_down_per_round_after": records[1]["bytes_down"],
            "bytes_down_total": sum(r["bytes_down"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, 3 networked rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats, rounds = (1, 3) if args.quick else (3, 6)
    torch.manual_seed(0)
    images, labels = make_images(200, seed=5)
    rows = [in_process("shapes_cnn", make_net(), images, labels, repeats)]
    if not args.quick:
        mnist_like = torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,))
        rows.append(in_process("fedavg_cnn", build_model("cnn"), *mnist_like, repeats))
    for row in rows:
        print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_client_folders(work / "clients", NUM_CLIENTS)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for rep in range(repeats):  # alternated, so that the machine's load falls on both alike
            for ship in (False, True):
                runs[ship].append(networked(work, ship, rounds, rep))
    net = {ship: {key: statistics.median(run[key] for run in runs[ship]) for key in runs[ship][0]}
           for ship in (False, True)}
    print(json.dumps({"part": "network", "model": "shapes_cnn", "clients": NUM_CLIENTS, "rounds": rounds,
                      "repeats": repeats, "imported": net[False], "shipped": net[True]}), flush=True)

    shapes = rows[0]
    headlines = [
        ("program_bytes_once_vs_weights_per_round", shapes["program_bytes"], shapes["weights_bytes_per_round"]),
        ("client_train_s_5_epochs", shapes["train_s_shipped"], shapes["train_s_imported"]),
        ("network_seconds_per_round", net[True]["seconds_per_round"], net[False]["seconds_per_round"]),
        ("network_bytes_down_total", net[True]["bytes_down_total"], net[False]["bytes_down_total"]),
    ]
    for metric, shipped, imported in headlines:
        print(json.dumps({"benchmark": "shipped_program", "metric": metric, "plait": round(shipped, 4),
                          "reference": round(imported, 4), "ratio": round(shipped / imported, 3), "goal": None}))


if __name__ == "__main__":
    main()
