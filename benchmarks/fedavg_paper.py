"""McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from Decentralized Data"), rerun with
Plait: rounds to the paper's target accuracy for each row, beside the paper's figure, with the two baselines FL must
beat and approach (each client alone; one model on all the data).

    .venv/bin/python benchmarks/fedavg_paper.py --quick          # the cheapest row, a few minutes
    .venv/bin/python benchmarks/fedavg_paper.py                  # every row below: hours on 2 cores
    .venv/bin/python benchmarks/fedavg_paper.py --rows 2nn-iid-b10 --lr-grid 0.05,0.1,0.2

MNIST, 100 clients, C = 0.1; IID or pathological non-IID (two digits per client); B = 0 is the paper's B = ∞
(full batch: FedSGD when E = 1). The paper tuned the learning rate per row on a grid; `--lr-grid` does the same and
keeps the rate that reaches the target in the fewest rounds. Figures go to runs/fedavg_paper/ (one run directory
per row and rate, results.md, accuracy-against-rounds plots). The last line of output is the headline as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Paper figures (rounds to target, C = 0.1): Table 1 (2NN, E = 1, target 97%) and Table 2 (CNN, target 99%).
ROWS = {
    "2nn-iid-b10": dict(model="2nn", partition="iid", epochs=1, batch_size=10, target=0.97, paper=87, lr=0.1),
    "2nn-noniid-b10": dict(model="2nn", partition="shards", epochs=1, batch_size=10, target=0.97, paper=664, lr=0.1),
    "2nn-iid-fedsgd": dict(model="2nn", partition="iid", epochs=1, batch_size=0, target=0.97, paper=1474, lr=0.1),
    "2nn-noniid-fedsgd": dict(model="2nn", partition="shards", epochs=1, batch_size=0, target=0.97, paper=1796,
                              lr=0.1),
    "cnn-iid-fedsgd": dict(model="cnn", partition="iid", epochs=1, batch_size=0, target=0.99, paper=626, lr=0.2),
    "cnn-noniid-fedsgd": dict(model="cnn", partition="shards", epochs=1, batch_size=0, target=0.99, paper=483,
                              lr=0.2),
    "cnn-iid-e1-b10": dict(model="cnn", partition="iid", epochs=1, batch_size=10, target=0.99, paper=34, lr=0.1),
    "cnn-noniid-e1-b10": dict(model="cnn", partition="shards", epochs=1, batch_size=10, target=0.99, paper=350,
                              lr=0.1),
    "cnn-iid-e5-b10": dict(model="cnn", partition="iid", epochs=5, batch_size=10, target=0.99, paper=20, lr=0.1),
    "cnn-noniid-e5-b10": dict(model="cnn", partition="shards", epochs=5, batch_size=10, target=0.99, paper=229,
                              lr=0.1),
}
QUICK = ["2nn-iid-b10"]


@dataclass
class Outcome:
    row: str
    lr: float
    rounds: int | None          # rounds to target (None: not reached within max_rounds)
    seconds: float
    curve: list[tuple[int, float]]


def run_row(name: str, lr: float, max_rounds: int, root: Path, seed: int = 0) -> tuple[Outcome, object]:
    from plait.experiment.runs.fl_simulation import run_federated
    from plait.federated.config import FederatedRunConfig
    from plait.federated.simulation import build_server
    from plait.settings.config import from_dict

    row = ROWS[name]
    raw = {"run": {"name": f"{name}-lr{lr}", "root": str(root), "seed": seed, "threads": 0, "tensorboard": False},
           "model": {"name": row["model"]},
           "data": {"name": "mnist", "num_clients": 100, "partition": row["partition"], "shards_per_client": 2},
           "fl": {"rounds": max_rounds, "fraction": 0.1, "min_clients": 2, "target_accuracy": row["target"],
                  "executor": "sequential",
                  "plan": {"epochs": row["epochs"], "batch_size": row["batch_size"], "lr": lr}}}
    config = from_dict(FederatedRunConfig, raw)
    summary = run_federated(config, show_progress=False, fresh_name=True)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["round"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
    reached = next((r["round"] for r in records if r.get("target_reached")), None)
    return Outcome(name, lr, reached, summary.train_seconds, curve), build_server(config)


def baselines(server, rounds: int) -> dict[str, float]:
    from plait.federated.baselines import centralised, local_only

    return {**local_only(server, rounds), **centralised(server, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"rows {QUICK} only")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--lr-grid", default="", help="comma-separated learning rates (default: the row's)")
    parser.add_argument("--max-rounds", type=int, default=0, help="give up after this many (default: 3x paper)")
    parser.add_argument("--out", default="runs/fedavg_paper")
    args = parser.parse_args()
    names = QUICK if args.quick else ([n for n in args.rows.split(",") if n] or list(ROWS))
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {list(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| row | lr | Plait rounds | paper rounds | ratio | local-only mean (p10-p90) | centralised | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    headline = None
    for name in names:
        rates = [float(x) for x in args.lr_grid.split(",") if x] or [ROWS[name]["lr"]]
        max_rounds = args.max_rounds or 3 * ROWS[name]["paper"]
        tried = []
        for lr in rates:
            started = time.perf_counter()
            outcome, server = run_row(name, lr, max_rounds, out)
            tried.append((outcome, server))
            print(f"{name} lr={lr}: rounds to target {outcome.rounds} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        best, server = min(tried, key=lambda t: t[0].rounds or 10**9)
        rounds = best.rounds or max_rounds
        extra = baselines(server, rounds)
        paper = ROWS[name]["paper"]
        ratio = rounds / paper
        lines.append(f"| {name} | {best.lr} | {best.rounds if best.rounds else f'> {max_rounds}'} | {paper} | "
                     f"{ratio:.2f} | {extra['local_accuracy_mean']:.4f} ({extra['local_accuracy_p10']:.4f}-"
                     f"{extra['local_accuracy_p90']:.4f}) | {extra['central_accuracy']:.4f} | {best.seconds:.0f} |")
        _plot(out / f"{name}.png", [(f"lr {o.lr}", o.curve) for o, _ in tried], ROWS[name]["target"], name)
        print(json.dumps({"benchmark": "fedavg_paper", "metric": f"rounds_to_target_{name}", "plait": best.rounds,
                          "reference": paper, "ratio": round(ratio, 3), "goal": "within 30% of the paper or read",
                          **{k: round(v, 4) for k, v in extra.items()}}), flush=True)
        headline = headline or (name, best.rounds, paper, ratio)
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    name, rounds, paper, ratio = headline
    print(json.dumps({"benchmark": "fedavg_paper", "metric": f"rounds_to_target_{name}", "plait": rounds,
                      "reference": paper, "ratio": round(ratio, 3), "goal": "within 30% of the paper or read"}))


def _plot(path: Path, lines, target: float, title: str) -> None:
    from plait.experiment.plots import Figure, save_figure

    lines = [(label, [(x, 100 * y) for x, y in points]) for label, points in lines if points]
    if lines:
        save_figure(path, Figure(f"{title}: test accuracy against rounds", "round", "test accuracy (%)", lines,
                                 hlines=[(100 * target, f"target {target:.0%}")]))


if __name__ == "__main__":
    main()
