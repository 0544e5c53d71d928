"""Round time and peak memory against the number of registered clients, the cohort held fixed (issue 13, point 4).

    .venv/bin/python benchmarks/many_clients.py [--quick]

FedAvg on real MNIST with the 2NN, 10^3, 10^4, 10^5 and 10^6 registered clients, each drawing 60 examples from the
pool (`data.examples_per_client`: clients' data is made when they are selected), C = 10 / registered so that about
10 clients report a round, heterogeneous devices with eligibility rules and 30% over-selection (the knobs of
examples/fedavg_mnist.toml); E = 1, B = 10. Each timing is a fresh process (its own start-up and peak RSS): one
warm-up round, then `--rounds` rounds timed. Three timings per size, taken in turn across the sizes (10^3, 10^4,
10^5, 10^6, 10^3, ...) so that a change in the machine's load falls on every size alike; the median is kept. No
test-set evaluation in the timed rounds (its cost does not depend on the clients). The reference is 10^3 clients;
the headline ratio is round time at 10^6 over 10^3 (goal: flat, <= 1.1). Without --quick it also times the scan
selection at 10^5 (every client's state drawn and listed each round, the way every round worked before).
The last line is the headline JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = (10**3, 10**4, 10**5, 10**6)
COHORT = 10


def _config(num_clients: int, selection: str):
    from plait.federated.config import FederatedRunConfig
    from plait.settings.config import from_dict

    return from_dict(FederatedRunConfig, {
        "run": {"seed": 0, "threads": 1}, "model": {"name": "2nn"},
        "data": {"name": "mnist", "num_clients": num_clients, "partition": "iid", "examples_per_client": 60},
        "fl": {"rounds": 10_000, "fraction": COHORT / num_clients, "min_clients": 2, "over_selection": 0.3,
               "eval_every": 0, "eligibility": {"charging": True, "unmetered": True},
               "plan": {"epochs": 1, "batch_size": 10, "lr": 0.05},
               "devices": {"speed_sigma": 0.7, "step_time_s": 0.01, "bandwidth_mbps": 20, "deadline_s": 30.0,
                           "p_charging": 0.8, "p_unmetered": 0.9, "selection": selection}}})


def measure(num_clients: int, rounds: int, selection: str) -> dict:
    """One size, in this process: start-up seconds, median seconds a round, peak RSS."""
    from plait.federated.simulation import build_server

    started = time.perf_counter()
    server = build_server(_config(num_clients, selection))
    startup = time.perf_counter() - started
    state, _ = server.run_round(server.initial_state())  # warm-up
    participants = []
    begin = time.perf_counter()
    for _ in range(rounds):
        state, record = server.run_round(state)
        participants.append(record["participants"])
    round_s = (time.perf_counter() - begin) / rounds
    server.close()
    return {"clients": num_clients, "selection": selection, "startup_s": startup, "round_s": round_s,
            "participants": statistics.mean(participants),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _in_fresh_process(num_clients: int, rounds: int, selection: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(num_clients), "--rounds", str(rounds),
                          "--selection", selection], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _medians(runs: list[dict]) -> dict:
    """One size's three timings: the median round and start-up, the highest peak RSS."""
    return {"round_s": statistics.median(r["round_s"] for r in runs), "timings": [r["round_s"] for r in runs],
            "startup_s": statistics.median(r["startup_s"] for r in runs),
            "participants": statistics.mean(r["participants"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per timing (default 10, --quick 4)")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a child: one size
    parser.add_argument("--selection", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (4 if args.quick else 10)
    if args.one:
        print(json.dumps(measure(args.one, rounds, args.selection)))
        return
    runs: dict[int, list[dict]] = {n: [] for n in SIZES}
    for _ in range(3):
        for n in SIZES:
            runs[n].append(_in_fresh_process(n, rounds, "auto"))
    results = {n: _medians(r) for n, r in runs.items()}
    for n, r in results.items():
        print(f"{n:>9,} registered: {r['round_s'] * 1e3:7.1f} ms a round (timings "
              f"{', '.join(f'{t * 1e3:.1f}' for t in r['timings'])}), {r['participants']:.1f} reports, start-up "
              f"{r['startup_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    reference = results[SIZES[0]]
    lines = [{"benchmark": "many_clients", "metric": f"round_s_{n}_clients", "plait": round(r["round_s"], 4),
              "reference": round(reference["round_s"], 4), "ratio": round(r["round_s"] / reference["round_s"], 3),
              "goal": 1.1, "peak_rss_mb": round(r["peak_rss_mb"]), "startup_s": round(r["startup_s"], 2)}
             for n, r in results.items() if n != SIZES[0]]
    if not args.quick:
        scan = _medians([_in_fresh_process(10**5, max(1, rounds // 5), "scan") for _ in range(3)])
        print(f"  scan selection at 100,000: {scan['round_s'] * 1e3:.1f} ms a round, peak RSS "
              f"{scan['peak_rss_mb']:.0f} MB")
        lines.insert(0, {"benchmark": "many_clients", "metric": "round_s_100000_clients_scan_vs_sample",
                         "plait": round(results[10**5]["round_s"], 4), "reference": round(scan["round_s"], 4),
                         "ratio": round(results[10**5]["round_s"] / scan["round_s"], 3), "goal": None})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
